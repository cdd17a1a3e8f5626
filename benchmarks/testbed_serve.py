"""S2O judged end to end through SGLang: the long-context testbed model (sgl_slim.testbed, trained here) answers
passkey and key-value retrieval prompts served by servers side by side: one without ``--s2o`` (SGLang's own dense
attention), one with ``--s2o`` per ``--s2o-flags`` value (its defaults without one; several values: several S2O
servers, each beside the same dense one), one more dense server per ``--dense-flags`` value (e.g. another chunked
prefill size) and, with ``--tau0``, one with ``--s2o --s2o-tau 0`` (whose outputs must equal the dense server's).

    python -m benchmarks.testbed_serve --model ~/.cache/sgl_slim/models/testbed/model \\
        --out benchmarks/results/testbed_serve.jsonl                    # CPU, float32
    python -m benchmarks.testbed_serve --model DIR --gpu --length 32768 --per-depth 6 --tau0 --out F   # a GPU
    python -m benchmarks.testbed_serve --model DIR --gpu --length 131072 --rope-scale 4 --per-depth 5 \
        --depths 0,0.25,0.5,0.75,1 --seed 2 --s2o-flags '' --s2o-flags '--s2o-variant v5' --out F   # 128K

Each prompt is a held-out retrieval sample (``sgl_slim.testbed.data.eval_samples``: the same tasks, depths and
seeds as the in-process evaluation) cut before its answer, sent as token ids to ``/generate`` with greedy
decoding for as many tokens as the answer has; correct = the generated ids equal the answer's. The servers are
up at once and each prompt goes to each (the order alternating), radix cache off, one warm-up request each.
Per request: correct, latency (prefill plus the answer's few greedy tokens), the generated ids and the S2O
density the server reports (``meta_info["sgl_slim"]``); per server, the share of requests whose ids equal the
dense server's, and the prompts it answers wrongly where dense is right (lost) and rightly where dense is wrong
(gained): a paired count, which resolves a difference between methods better than two accuracies. The servers
run with ``--enable-metrics``, so each request also carries where its latency went
(``benchmarks.harness.REQUEST_PHASES``: ``preprocess_s``, ``to_forward_s``, ``prefill_s``, every prefill chunk's
forward included), with their medians per server.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.harness import REQUEST_PHASES, env_info, markdown_table, record, request_phases, write_results
from sgl_slim.bench.runner import LaunchedServer, running


TAU0 = "s2o_tau0"


def server_specs(s2o_flags: list[str], tau0: bool, dense_flags: list[str] = ()) -> dict[str, list[str]]:
    """Server name -> its flags: "dense" (none), one more dense server per ``dense_flags`` value ("dense " + its
    flags), one S2O server per ``s2o_flags`` value (named "s2o", or "s2o " + its flags), and with ``tau0`` one
    with ``--s2o --s2o-tau 0``."""
    specs = {"dense": []}
    for flags in dense_flags:
        specs[f"dense {flags}".strip()] = flags.split()
    for flags in s2o_flags or [""]:
        specs[f"s2o {flags}".strip()] = ["--s2o", *flags.split()]
    if tau0:
        specs[TAU0] = ["--s2o", "--s2o-tau", "0"]
    return specs


def server_args(model: str, length: int, flags: list[str], min_length: int, gpu: bool, servers: int) -> list[str]:
    """A CPU server in float32, or a GPU server in bf16 on SGLang's Triton attention (its fastest backend that
    needs no compiled library) sharing the GPU with the other servers; ``flags``: its own flags (an S2O server
    also gets ``--s2o-min-length``)."""
    args = ["--model-path", model, "--disable-radix-cache", "--context-length", str(2 * length),
            "--max-total-tokens", str(3 * length), "--skip-server-warmup", "--enable-metrics"]
    args += (["--dtype", "bfloat16", "--attention-backend", "triton", "--mem-fraction-static",
              f"{int(80 / servers) / 100:.2f}"] if gpu else ["--dtype", "float32"])
    return args + list(flags) + (["--s2o-min-length", str(min_length)] if "--s2o" in flags else [])


def ask(base_url: str, ids: list[int], answer: list[int]) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": len(answer), "temperature": 0.0}}
    t0 = time.perf_counter()
    req = urllib.request.Request(base_url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        out = json.loads(r.read())
    numbers = out["meta_info"].get("sgl_slim", {})
    return {"correct": out["output_ids"] == answer, "latency_s": time.perf_counter() - t0,
            "density": numbers.get("s2o_density"), "output_ids": out["output_ids"],
            **request_phases(out["meta_info"])}


def summarise(rows: list[dict], servers: list[str], tasks: list[str], length: int) -> list[dict]:
    """Per server: median latency and phases, accuracy per task, and the paired count against the dense server
    (``rows``: every server's answer to each prompt, in prompt order per server)."""
    summary = []
    dense = [r for r in rows if r["server"] == "dense"]
    for name in servers:
        mine = [r for r in rows if r["server"] == name]
        row = record("testbed_serve", server=name, length=length, samples=len(mine),
                     latency_s=statistics.median(r["latency_s"] for r in mine))
        for name_, _, _ in REQUEST_PHASES:           # where the latency goes (the servers run --enable-metrics)
            values = [r[name_] for r in mine if name_ in r]
            row[f"{name_}_median"] = statistics.median(values) if values else None
        for task in tasks:
            hits = [r["correct"] for r in mine if r["task"] == task]
            row[f"{task}_accuracy"] = sum(hits) / len(hits) if hits else None
        row["equal_to_dense"] = sum(a["output_ids"] == b["output_ids"] for a, b in zip(mine, dense)) / len(mine)
        row["lost_vs_dense"] = sum(b["correct"] and not a["correct"] for a, b in zip(mine, dense))
        row["gained_vs_dense"] = sum(a["correct"] and not b["correct"] for a, b in zip(mine, dense))
        densities = [r["density"] for r in mine if r["density"] is not None]
        row["s2o_density"] = statistics.mean(densities) if densities else None
        summary.append(row)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the testbed checkpoint (sgl_slim.testbed.pipeline)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--tasks", default="passkey,kv")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--per-depth", type=int, default=3)
    ap.add_argument("--min-length", type=int, default=1024, help="--s2o-min-length of the S2O server")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=32600)
    ap.add_argument("--gpu", action="store_true", help="serve on the GPU (bf16, Triton attention)")
    ap.add_argument("--tau0", action="store_true", help="a third server with --s2o --s2o-tau 0")
    ap.add_argument("--dense-flags", action="append", default=[],
                    help="flags of one more dense server, e.g. '--chunked-prefill-size 32768'; repeat for several")
    ap.add_argument("--s2o-flags", action="append", default=[],
                    help="flags of one --s2o server, e.g. '--s2o-variant v5' ('' = its defaults); repeat for several")
    ap.add_argument("--rope-scale", type=float, default=0.0,
                    help="serve the checkpoint with Llama-3.1 RoPE scaling by this factor from 32K (every server; "
                         "the model is trained at 32K: 4 for 128K)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from transformers import AutoTokenizer

    from sgl_slim.testbed.data import Pieces, corpus_stream, eval_samples

    work = Path("/tmp/sgl_slim_testbed_serve")        # the scaled checkpoint's links and the servers' logs
    if args.rope_scale:
        from sgl_slim.testbed.model import with_rope_scaling  # noqa: PLC0415
        args.model = str(with_rope_scaling(args.model, work / f"rope{args.rope_scale:g}", args.rope_scale))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stream = corpus_stream(tokenizer, "eval", args.length * 6 + 200_000)
    pieces = Pieces(tokenizer)
    depths = [float(d) for d in args.depths.split(",")]
    samples = [(task, s) for task in args.tasks.split(",")
               for s in eval_samples(stream, pieces, kind=task, length=args.length, depths=depths,
                                     per_depth=args.per_depth, seed=args.seed)]
    work.mkdir(exist_ok=True)
    specs = server_specs(args.s2o_flags, args.tau0, args.dense_flags)
    servers = {name: LaunchedServer(server_args(args.model, args.length, flags, args.min_length, args.gpu,
                                                len(specs)),
                                    port=args.port + i, log_path=work / f"server{i}.log")
               for i, (name, flags) in enumerate(specs.items())}
    rows = []
    try:
        with running(servers):
            (start, end), = samples[0][1].answers
            for name, server in servers.items():       # warm-up: kernels compile on first use, out of the timing
                got = ask(server.base_url, samples[0][1].ids[:start], samples[0][1].ids[start:end])
                if name != TAU0 and (got["density"] is None) != name.startswith("dense"):
                    # (once a server left over from an earlier run answered on a port: the comparison would be void)
                    raise RuntimeError(f"the {name} server at {server.base_url} answered "
                                       f"{'with' if got['density'] is not None else 'without'} S2O")
            for i, (task, sample) in enumerate(samples):
                (start, end), = sample.answers
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                for name in order:
                    result = ask(servers[name].base_url, sample.ids[:start], sample.ids[start:end])
                    rows.append(record("testbed_serve_request", server=name, task=task, depth=sample.depth,
                                       prompt_tokens=start, **result))
                    print(rows[-1], flush=True)
    finally:
        # also when stopped early (a deadline's SIGTERM): the prompts every server answered, summarised
        rows = rows[:len(rows) - len(rows) % len(servers)]
        if rows:
            summary = summarise(rows, list(servers), args.tasks.split(","), args.length)
            write_results(args.out, rows + summary, env=env_info())
            print(markdown_table(summary, ["server", "length", "samples",
                                           *[f"{t}_accuracy" for t in args.tasks.split(",")], "s2o_density",
                                           "equal_to_dense", "lost_vs_dense", "gained_vs_dense", "latency_s",
                                           "prefill_s_median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
