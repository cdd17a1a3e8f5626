"""Training and evaluation data of the testbed: real text plus synthetic long-range retrieval tasks.

Real text: the Python standard library that every Python installation ships (source, docstrings, and the
library reference in ``pydoc_data/topics.py``), split by a hash of the file name (``sgl_slim.spec.data``):
"train" files for training, "eval" files for the held-out loss and every evaluation haystack.

Synthetic tasks are written as Python so that they read like the corpus; a needle is planted in a window of
real text at a chosen depth and asked for at the end:

  passkey   haystack ... ``\\nPASSKEY = "48213"\\n`` ... haystack ``\\nassert PASSKEY == "`` -> ``48213``
  kv        2-16 lines (at most one per 256 tokens) ``\\nKV["hqtz"] = "48213"\\n`` spread through the haystack, then 1-4 questions
            ``\\nassert KV["hqtz"] == "`` -> ``48213`` (a key may be asked twice)

Each piece is tokenized on its own: the byte-level pre-tokenizer splits at the quotes and digit runs, so the
pieces concatenate to the same ids as the whole text.  Every sample is a pure function of (seed, index):
training resumes exactly, and evaluation sets are the same for every attention method.

Needle positions in training are uniform over the haystack, except that START_SHARE of the retrieval samples put
the asked needle at the very start: uniform positions almost never do, and a model trained without them treats the
first tokens as its attention sink only, losing a needle planted there (dense key-value accuracy at depth 0 was
0.05-0.15 at 16K and 32K against 0.88-1.0 at every other depth; benchmarks/testbed.md).

Loss weights (per sample, summing to 1 + ANSWER_WEIGHT): each haystack/question token 1/n_text, each answer
token ANSWER_WEIGHT/n_answer; the random needle values themselves carry no weight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from sgl_slim.spec.data import stdlib_files

ANSWER_WEIGHT = 1.0
KEY_LETTERS = "abcdefghjkmnpqrstuvwxyz"
TASKS = ("lm", "passkey", "kv")
START_SHARE = 0.1          # training retrieval samples whose asked needle opens the sequence


def corpus_stream(tokenizer, split: str, max_tokens: int) -> torch.Tensor:
    """Token ids of the split's stdlib files in sorted order, files separated by <|endoftext|> -> [N] int64."""
    backend = tokenizer.backend_tokenizer
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    files = stdlib_files(split)
    for i in range(0, len(files), 64):
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files[i:i + 64]]
        for enc in backend.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(sep)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


class Pieces:
    """Cached tokenization of the task templates' pieces."""

    def __init__(self, tokenizer):
        self._backend = tokenizer.backend_tokenizer
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._backend.encode(text, add_special_tokens=False).ids
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids


@dataclass
class Sample:
    ids: list[int]
    weights: list[float]                      # weight of ids[i] as a LABEL (predicted from position i - 1)
    answers: list[tuple[int, int]] = field(default_factory=list)   # [start, end) token spans to retrieve
    kind: str = "lm"
    depth: float | None = None


def _value(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(KEY_LETTERS) for _ in range(4))


def build_sample(stream: torch.Tensor, length: int, pieces: Pieces, rng: random.Random, *, kind: str,
                 depth: float | None = None, n_pairs: int | None = None, n_queries: int | None = None) -> Sample:
    """One sample of exactly ``length`` tokens.  ``depth`` in [0, 1] places the (first) asked needle at that
    fraction of the haystack (if None: uniform, or the very start with probability START_SHARE);
    ``n_pairs`` / ``n_queries`` fix the kv task's sizes."""
    if kind not in TASKS:
        raise ValueError(f"kind must be one of {TASKS}, got {kind!r}")
    if kind == "lm":
        start = rng.randrange(stream.numel() - length)
        ids = stream[start:start + length].tolist()
        return Sample(ids, [0.0] + [1.0 / (length - 1)] * (length - 1), kind="lm")
    if kind == "passkey":
        value = _value(rng)
        needles = [(pieces('\nPASSKEY = "'), pieces(value), pieces('"\n'))]
        questions = [(pieces('\nassert PASSKEY == "'), pieces(value))]
        asked_needle = 0
    else:
        n_pairs = n_pairs if n_pairs is not None else rng.randint(2, max(2, min(16, length // 256)))
        n_queries = n_queries if n_queries is not None else rng.randint(1, max(1, min(4, length // 512)))
        keys: list[str] = []
        while len(keys) < n_pairs:
            key = _key(rng)
            if key not in keys:
                keys.append(key)
        values = [_value(rng) for _ in keys]
        needles = [(pieces(f'\nKV["{k}"] = "'), pieces(v), pieces('"\n')) for k, v in zip(keys, values)]
        asked = [rng.randrange(n_pairs) for _ in range(n_queries)]
        if n_queries > 1 and rng.random() < 0.5:
            asked[-1] = asked[0]                                     # a key asked for twice
        asked_needle = asked[0]
        questions = [(pieces(f'\nassert KV["{keys[i]}"] == "'), pieces(values[i])) for i in asked]
    close = pieces('"')
    tail_len = sum(len(q) + len(a) + len(close) for q, a in questions)
    needle_len = sum(len(a) + len(b) + len(c) for a, b, c in needles)
    hay_len = length - tail_len - needle_len
    if hay_len < 16:
        raise ValueError(f"length {length} is too short for a {kind} sample ({needle_len + tail_len} task tokens)")
    start = rng.randrange(stream.numel() - hay_len)
    hay = stream[start:start + hay_len].tolist()
    # needle positions in the haystack: the asked one at ``depth``, the others uniform
    pos = [rng.randint(0, hay_len) for _ in needles]
    if depth is not None:
        pos[asked_needle] = round(depth * hay_len)
    elif rng.random() < START_SHARE:
        pos[asked_needle] = 0
    ids: list[int] = []
    weights: list[float] = []
    order = sorted(range(len(needles)), key=lambda i: (pos[i], i))
    cursor = 0
    text_w = 1.0  # markers: 1 text, 0 needle value, -1 answer; replaced by the real weights below
    for i in order:
        ids += hay[cursor:pos[i]]
        weights += [text_w] * (pos[i] - cursor)
        cursor = pos[i]
        head, val, tail = needles[i]
        ids += head + val + tail
        weights += [text_w] * len(head) + [0.0] * len(val) + [text_w] * len(tail)
    ids += hay[cursor:]
    weights += [text_w] * (hay_len - cursor)
    answers = []
    for question, answer in questions:
        ids += question
        weights += [text_w] * len(question)
        answers.append((len(ids), len(ids) + len(answer)))
        ids += answer + close
        weights += [-1.0] * len(answer) + [text_w] * len(close)
    n_answer = sum(e - s for s, e in answers)
    n_text = sum(1 for w in weights if w == text_w) - 1          # the first token is never a label
    w_text, w_ans = 1.0 / n_text, ANSWER_WEIGHT / n_answer
    weights = [w_ans if w < 0 else (w_text if w == text_w else 0.0) for w in weights]
    weights[0] = 0.0
    return Sample(ids, weights, answers, kind=kind, depth=depth)


def sample_rng(seed: int, *index: int) -> random.Random:
    """The random source of one sample: a pure function of the seed and the sample's index."""
    return random.Random(":".join(str(i) for i in (seed,) + tuple(index)))   # str seeds hash with SHA-512


def training_batch(stream: torch.Tensor, pieces: Pieces, *, seed: int, step: int, batch: int, length: int,
                   mix: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a phase: tokens [B, L] int64, label weights [B, L] fp32 (position i weights token i
    as the label of position i - 1), answer mask [B, L] bool (answer tokens).  Task kinds are drawn per
    sample with probabilities ``mix``."""
    kinds, probs = zip(*sorted(mix.items()))
    tokens, weights = [], []
    answer = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        rng = sample_rng(seed, length, step, b)
        kind = rng.choices(kinds, probs)[0]
        s = build_sample(stream, length, pieces, rng, kind=kind)
        tokens.append(s.ids)
        weights.append(s.weights)
        for lo, hi in s.answers:
            answer[b, lo:hi] = True
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(weights, dtype=torch.float32), answer


def eval_samples(stream: torch.Tensor, pieces: Pieces, *, kind: str, length: int, depths: list[float],
                 per_depth: int, seed: int, n_pairs: int = 8) -> list[Sample]:
    """The retrieval set of one (task, length): ``per_depth`` samples at each depth, one question each."""
    out = []
    for di, depth in enumerate(depths):
        for i in range(per_depth):
            rng = sample_rng(seed, 7919, length, di, i, TASKS.index(kind))
            out.append(build_sample(stream, length, pieces, rng, kind=kind, depth=depth,
                                    n_pairs=n_pairs if kind == "kv" else None, n_queries=1))
    return out
