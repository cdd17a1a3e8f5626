"""Scale-out on the CPU demo: ``--tp-size 2`` and ``--dp-size 2`` with IDPruner on give the same greedy outputs
(and the same pruned prompt lengths) as the shared single-worker server (conftest.py), same flags otherwise.

Needs sgl_slim's two CPU fixes (stock SGLang 0.5.23 cannot start either on this machine): the launcher's
per-rank core split (SGLANG_CPU_OMP_THREADS_BIND; SGLang refuses more ranks than NUMA nodes) and
sgl_slim.integration.standins.cpu_parallel (no PyNccl communicator on the CPU engine)."""

import pytest

from serving import VL_ARGS, greedy, image_message, png_data_url, shared_server

pytestmark = pytest.mark.e2e

PROMPTS = [
    image_message("Describe the image.", png_data_url(seed=3)),
    image_message("Describe the image.", png_data_url(width=448, height=224, seed=4)),
    [{"role": "user", "content": "Count from one to ten in words."}],
    [{"role": "user", "content": "Write a haiku about a quiet river at dawn."}],
]


def _answers(srv) -> list[tuple[str, int]]:
    client = srv.openai()
    out = []
    for messages in PROMPTS:
        r = greedy(client, messages, max_tokens=12)
        out.append((r.choices[0].message.content, r.usage.prompt_tokens))
    return out


scaled_server = shared_server(params={"tp": [*VL_ARGS, "--tp-size", "2"], "dp": [*VL_ARGS, "--dp-size", "2"]})


def test_two_workers_match_one(vl_server, scaled_server):
    kind, srv = scaled_server
    one, two = _answers(vl_server), _answers(srv)
    assert two == one, f"--{kind}-size 2 differs from one worker:\n{two}\nvs\n{one}"
    # the images were pruned on the scaled server too: 64 vision tokens -> 16 (224x224), 128 -> 32 (448x224)
    assert one[0][1] < one[1][1] and one[1][1] - one[0][1] == 16


def test_ranks_are_bound_and_registered(scaled_server):
    kind, srv = scaled_server
    log = srv.log()
    assert "SGLANG_CPU_OMP_THREADS_BIND=" in log
    # sgl_slim registered in every process: the launcher (which runs the tokenizer), both scheduler ranks, the
    # detokenizer, and with --dp-size the data-parallel controller too
    assert len(set(srv.registered_pids())) >= {"tp": 4, "dp": 5}[kind], srv.registered_pids()


def test_per_request_settings_hold_on_two_workers(vl_server, scaled_server):
    # a request's own keep ratio is applied by whichever worker serves it: the same answer and prompt length as
    # on one worker, and a different prompt length from the server's default ratio
    kind, srv = scaled_server
    messages = image_message("Describe the image.", png_data_url(width=448, height=224, seed=4))
    asks = [{"sgl_slim": {"idpruner_keep_ratio": r}} for r in (0.5, 1.0)]

    def run(server, body):
        r = greedy(server.openai(), messages, extra_body=body)
        return r.choices[0].message.content, r.usage.prompt_tokens

    for body in asks:
        assert run(srv, body) == run(vl_server, body), f"--{kind}-size 2 differs from one worker for {body}"
    default_len = run(srv, None)[1]
    lens = [run(srv, body)[1] for body in asks]
    # 128 vision tokens at 448x224: the server's 0.25 keeps 32, 0.5 keeps 64, 1.0 keeps 128
    assert [n - default_len for n in lens] == [32, 96], (default_len, lens)
