import random

import pytest
import torch

from sgl_slim.testbed.data import (ANSWER_WEIGHT, START_SHARE, Pieces, build_sample, eval_samples, sample_rng,
                                  training_batch)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids)


def test_pieces_concatenate_to_the_whole_text(tokenizer):
    pieces = Pieces(tokenizer)
    whole = tokenizer.backend_tokenizer.encode('\nassert KV["hqtz"] == "48213"', add_special_tokens=False).ids
    assert pieces('\nassert KV["hqtz"] == "') + pieces("48213") + pieces('"') == whole


@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_retrieval_sample_layout(tokenizer, stream, kind):
    pieces = Pieces(tokenizer)
    s = build_sample(stream, 2048, pieces, random.Random(5), kind=kind, depth=0.5, n_pairs=6, n_queries=1)
    assert len(s.ids) == len(s.weights) == 2048
    assert len(s.answers) == 1
    lo, hi = s.answers[0]
    answer = _decode(tokenizer, s.ids[lo:hi])
    assert answer.isdigit() and len(answer) == 5
    text = _decode(tokenizer, s.ids)
    asked = "PASSKEY" if kind == "passkey" else text[text.rindex('KV["'):].split('"')[1]
    planted = text.index(f'{asked} = "{answer}"' if kind == "passkey" else f'KV["{asked}"] = "{answer}"')
    # the asked needle sits at half the haystack (character position ~ token position; generous bounds)
    assert 0.35 < planted / len(text) < 0.65
    assert text.endswith(f'== "{answer}"')
    # weights: text tokens sum to 1, answer tokens to ANSWER_WEIGHT, the planted value carries none
    w = torch.tensor(s.weights)
    assert abs(w[lo:hi].sum().item() - ANSWER_WEIGHT) < 1e-5
    assert abs(w.sum().item() - (1 + ANSWER_WEIGHT)) < 1e-4
    assert w[0] == 0


def test_depth_zero_and_one_place_the_needle_at_the_ends(tokenizer, stream):
    pieces = Pieces(tokenizer)
    first = build_sample(stream, 1024, pieces, random.Random(1), kind="passkey", depth=0.0)
    last = build_sample(stream, 1024, pieces, random.Random(1), kind="passkey", depth=1.0)
    needle = pieces('\nPASSKEY = "')
    assert first.ids[:len(needle)] == needle
    lo, hi = last.answers[0]
    value = _decode(tokenizer, last.ids[lo:hi])
    assert _decode(tokenizer, last.ids).endswith(f'PASSKEY = "{value}"\n\nassert PASSKEY == "{value}"')


def test_samples_are_pure_functions_of_seed_and_index(tokenizer, stream):
    pieces = Pieces(tokenizer)
    a = training_batch(stream, pieces, seed=3, step=7, batch=4, length=512, mix={"lm": 0.3, "passkey": 0.3, "kv": 0.4})
    b = training_batch(stream, pieces, seed=3, step=7, batch=4, length=512, mix={"lm": 0.3, "passkey": 0.3, "kv": 0.4})
    c = training_batch(stream, pieces, seed=3, step=8, batch=4, length=512, mix={"lm": 0.3, "passkey": 0.3, "kv": 0.4})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    tokens, weights, answer = a
    assert tokens.shape == weights.shape == answer.shape == (4, 512)
    assert (weights[answer] > 0).all()
    assert sample_rng(1, 2).random() == sample_rng(1, 2).random() != sample_rng(1, 3).random()


def test_kv_asks_a_key_twice_sometimes(tokenizer, stream):
    pieces = Pieces(tokenizer)
    twice = 0
    for i in range(40):
        s = build_sample(stream, 4096, pieces, random.Random(i), kind="kv")
        text = _decode(tokenizer, s.ids)
        asked = [part.split('"')[1] for part in text.split("assert KV[")[1:]]
        assert len(asked) == len(s.answers) >= 1
        twice += len(asked) > 1 and asked[0] == asked[-1]
    assert twice > 0


def test_eval_sets_cover_the_depth_grid(tokenizer, stream):
    samples = eval_samples(stream, Pieces(tokenizer), kind="kv", length=1024, depths=[0.0, 0.5, 1.0], per_depth=3,
                           seed=1)
    assert [s.depth for s in samples] == [0.0] * 3 + [0.5] * 3 + [1.0] * 3
    assert all(len(s.answers) == 1 and len(s.ids) == 1024 for s in samples)


def test_too_short_length_names_the_problem(tokenizer, stream):
    with pytest.raises(ValueError, match="too short"):
        build_sample(stream, 40, Pieces(tokenizer), random.Random(0), kind="kv", n_pairs=8)


def _opens_with_asked_needle(tokenizer, sample, kind) -> bool:
    text = _decode(tokenizer, sample.ids)
    asked = "PASSKEY" if kind == "passkey" else 'KV["' + text[text.rindex('KV["'):].split('"')[1] + '"]'
    return text.startswith(f"\n{asked} = ")


@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_training_samples_open_with_the_asked_needle_at_the_start_share(tokenizer, stream, kind):
    # uniform positions alone almost never put a needle at the start; START_SHARE of the samples do
    pieces = Pieces(tokenizer)
    n = 400
    opened = sum(_opens_with_asked_needle(tokenizer, build_sample(stream, 1024, pieces, sample_rng(11, i),
                                                                  kind=kind, n_queries=1), kind) for i in range(n))
    assert abs(opened / n - START_SHARE) < 3 * (START_SHARE * (1 - START_SHARE) / n) ** 0.5
    # an explicit depth is never moved
    assert not any(_opens_with_asked_needle(tokenizer, build_sample(stream, 1024, pieces, sample_rng(12, i),
                                                                    kind=kind, depth=0.5, n_queries=1), kind)
                   for i in range(50))
