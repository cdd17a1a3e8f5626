"""The whole testbed in one GPU call: train, bring the checkpoint back, evaluate, dump, calibrate.

    python -m sgl_slim.testbed.pipeline --out OUT [--deadline 900] [--train-budget 480] [--plan default]
    python -m sgl_slim.testbed.pipeline --out OUT --model DIR --skip dense,extrapolate   # no training

Stages, in order of value (each checks the time left before the ``--deadline`` in seconds from the start):
  1. train (``train``), checkpoint packed as OUT/testbed_ckpt.tar.NN (15 MiB parts; ``cat`` them to untar);
  2. dense evaluation at 4K / 16K / 32K (held-out loss, passkey and key-value retrieval, 5 depths);
  3. calibration to ``--error-budget`` at 16K (OUT/s2o_calibration.json);
  4. head statistics and the rel-L2 / density / time frontier of one 32K prompt's real q/k/v, beside the
     synthetic generator;
  5. sparse methods at 32K: S2O v1 / v2 at several taus, the calibrated file, the best global tau, and every
     baseline of ``sgl_slim.attention.baselines``, with the dense run of the same samples;
  6. extrapolation: dense at 64K without and with Llama-3.1 RoPE scaling (factor 4 from 32K).
Every row goes to OUT/testbed_results.jsonl as soon as it exists; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
import traceback
from pathlib import Path

import torch

from sgl_slim.testbed import append_jsonl

PART_BYTES = 15 * 1024 * 1024


def pack(src_dir: Path, extra: list[Path], out_prefix: Path) -> list[Path]:
    """tar of ``src_dir`` (as ``model/``) and ``extra`` files, split into PART_BYTES parts."""
    tar_path = out_prefix.with_suffix(".tar.tmp")
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src_dir, arcname="model")
        for p in extra:
            if p.is_file():
                tar.add(p, arcname=p.name)
    data = tar_path.read_bytes()
    tar_path.unlink()
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out_prefix.parent / f"{out_prefix.name}.tar.{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/testbed_work", help="scratch directory (training state)")
    ap.add_argument("--plan", default="default")
    ap.add_argument("--model", default=None, help="evaluate this checkpoint instead of training one")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out (dense, extrapolate, ...)")
    ap.add_argument("--deadline", type=float, default=900.0)
    ap.add_argument("--train-budget", type=float, default=480.0)
    ap.add_argument("--error-budget", type=float, default=0.01)
    ap.add_argument("--per-depth", type=int, default=50)
    ap.add_argument("--sparse-per-depth", type=int, default=10)
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--calib-length", type=int, default=16384)
    ap.add_argument("--sparse-length", type=int, default=32768)
    ap.add_argument("--extrapolate", default="65536")
    ap.add_argument("--s2o", default="s2o:v1:1e-4,s2o:v1:1e-3,s2o:v2:1e-3,s2o:v2:1e-2,s2o:v2:3e-2")
    ap.add_argument("--gammas", default="0.9,0.97")
    ap.add_argument("--block-size", type=int, default=None, help="default: s2o_attention's")
    ap.add_argument("--segment-size", type=int, default=None, help="default: s2o_attention's")
    ap.add_argument("--frontier-methods", default="s2o:v1:1e-4,s2o:v2:1e-3,s2o:v2:1e-2,topcdf:0.9,pbs:0.9")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = dict(block_size=args.block_size, segment_size=args.segment_size)
    t0 = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "testbed_results.jsonl"
    left = lambda: args.deadline - (time.time() - t0)  # noqa: E731

    def log(r):
        r = dict(r, t_s=round(time.time() - t0, 1))
        print(json.dumps(r), flush=True)
        append_jsonl(results, [r])

    def stage(name, fn):
        t = time.time()
        try:
            fn()
            log({"bench": "testbed_stage", "stage": name, "ok": True, "s": round(time.time() - t, 1)})
        except Exception:  # noqa: BLE001 (keep the stages that work; the traceback is recorded)
            traceback.print_exc()
            log({"bench": "testbed_stage", "stage": name, "ok": False, "error": traceback.format_exc()[-2000:]})

    if args.model:
        model_dir = Path(args.model)
    else:
        from sgl_slim.testbed.train import train  # noqa: PLC0415

        rec = train(work, plan=args.plan, time_budget=args.train_budget, progress=True)
        log({"bench": "testbed_train", **rec})
        parts = pack(work / "model", [work / "train_log.jsonl", work / "train_loss.png"], out / "testbed_ckpt")
        log({"bench": "testbed_pack", "parts": [p.name for p in parts],
             "bytes": sum(p.stat().st_size for p in parts)})
        model_dir = work / "model"

    from transformers import AutoTokenizer  # noqa: PLC0415

    from sgl_slim.testbed import eval as ev  # noqa: PLC0415
    from sgl_slim.testbed.data import corpus_stream  # noqa: PLC0415
    from sgl_slim.testbed.model import llama3_rope, load_model  # noqa: PLC0415

    model = load_model(model_dir, device=device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream = corpus_stream(tokenizer, "eval", 3_000_000)
    lengths = [int(x) for x in args.lengths.split(",")]
    common = dict(stream=stream, device=device, log=log, **sizes)
    stage = _skipping(stage, set(args.skip.split(",")) - {""})
    stage("dense", lambda: ev.evaluate(model, tokenizer, ["dense"], lengths=lengths, per_depth=args.per_depth,
                                       time_budget=left() - 200, **common))
    cal_path = out / "s2o_calibration.json"
    g = {}

    def calibrate_stage():
        from sgl_slim.calibrate import calibrate  # noqa: PLC0415
        from sgl_slim.testbed.dump import long_prompt  # noqa: PLC0415

        prompts = [long_prompt(tokenizer, args.calib_length, seed=100 + i, stream=stream).to(device)
                   for i in range(2)]
        cal, summary = calibrate(model, prompts, model_name="sgl_slim-testbed", error_budget=args.error_budget,
                                 **sizes)
        cal.save(cal_path)
        g.update(summary)
        log(summary)

    stage("calibrate", calibrate_stage)


    def dump_stage():
        from sgl_slim.testbed import dump  # noqa: PLC0415

        qkv = dump.capture_qkv(model, dump.long_prompt(tokenizer, args.sparse_length, stream=stream).to(device))
        cfg = model.config
        gen = dump.generator_qkv(args.sparse_length, cfg.num_attention_heads, cfg.num_key_value_heads,
                                 cfg.head_dim, device)
        rows = dump.stats_rows(qkv, "model") + dump.stats_rows(gen, "generator")
        for r in rows:
            log(r)
        for line in dump.summarize_heads(rows):
            log(dict(line, bench="testbed_heads_summary"))
        methods = args.frontier_methods.split(",")
        dump.frontier(qkv, methods, source="model", log=log, **sizes)
        dump.frontier(gen, methods, source="generator", log=log, **sizes)

    stage("dump", dump_stage)

    def sparse_stage():
        from sgl_slim.attention import baselines  # noqa: PLC0415

        names = sorted(n[7:] for n in dir(baselines) if n.startswith("select_") and callable(getattr(baselines, n)))
        methods = ["dense"] + args.s2o.split(",")
        if cal_path.is_file():
            methods.append(f"calib:{cal_path}")
        if g.get("global_tau"):
            methods.append(f"s2o:{g['variant']}:{g['global_tau']}")
        methods += [f"{n}:{x}" for x in args.gammas.split(",") for n in names]
        ev.evaluate(model, tokenizer, methods, lengths=[args.sparse_length], per_depth=args.sparse_per_depth,
                    loss_windows=2, time_budget=left() - 40, **common)

    stage("sparse", sparse_stage)

    def extrapolate_stage():
        from transformers import LlamaForCausalLM  # noqa: PLC0415

        for L in [int(x) for x in args.extrapolate.split(",") if x]:
            for scaled in (False, True):
                if left() < 30:
                    log({"bench": "testbed_eval", "length": L, "skipped": "time budget"})
                    return
                m = model
                if scaled:
                    m = LlamaForCausalLM.from_pretrained(
                        str(model_dir), dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                        attn_implementation="sdpa",
                        rope_parameters=llama3_rope(4.0)).to(device).eval()
                    log({"bench": "testbed_rope", "rope_parameters": m.config.rope_parameters})
                rows = ev.evaluate(m, tokenizer, ["dense"], lengths=[L], per_depth=10, loss_windows=2,
                                   time_budget=left() - 20, stream=stream, device=device, **sizes,
                                   log=lambda r, s=scaled: log(dict(r, rope="llama3x4" if s else "default")))
                del rows

    stage("extrapolate", extrapolate_stage)
    table(results)


def _skipping(stage, skip: set[str]):
    def run(name, fn):
        if name not in skip:
            stage(name, fn)
    return run


def table(results: Path) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    summ = [r for r in rows if r.get("bench") == "testbed_eval" and "heldout_loss" in r]
    dense_ms = {r["length"]: r["attn_ms_per_call"] for r in summ if r["method"] == "dense" and not r.get("rope")}
    print(f"{'method':32s} {'L':>6s} {'loss':>7s} {'passkey':>7s} {'kv':>6s} {'density':>7s} {'attn ms':>8s} "
          f"{'speedup':>7s}")
    for r in summ:
        sp = dense_ms.get(r["length"], float("nan")) / r["attn_ms_per_call"] if r["attn_ms"] else float("nan")
        name = r["method"][:28] + ("/" + r["rope"] if r.get("rope") else "")
        print(f"{name:32s} {r['length']:6d} {r['heldout_loss']:7.4f} {r.get('passkey_accuracy', float('nan')):7.3f} "
              f"{r.get('kv_accuracy', float('nan')):6.3f} {r['density']:7.3f} {r['attn_ms']:8.1f} {sp:7.2f}")


if __name__ == "__main__":
    main()
