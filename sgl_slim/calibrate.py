"""Calibrate S2O to an error budget: per layer and per KV head, the cheapest tau that keeps the attention
output within the budget on a few calibration prompts; written as an ``--s2o-calibration`` file.

    python -m sgl_slim.calibrate --model DIR --error-budget 0.01 [--length 16384] [--prompts 2] \\
        [--variant v2] [--block-size B] [--segment-size S] [--out DIR/s2o_calibration.json]

Method: one dense forward per prompt records every layer's q/k/v (post-RoPE; transformers, any device);
for each layer the fp32 dense output is the reference and S2O runs at every tau of a ladder (0, 1e-6 ...
0.1).  The error of KV head h is the relative L2 error of the outputs of its query heads; a tau qualifies
for (layer, h) when the error is within the budget on EVERY prompt, and the chosen tau is the largest of
the ladder's qualifying prefix (errors need not grow monotonically with tau: the first failure ends the
search).  The early stop is decided per (query tile, head), so one run at a scalar tau gives every head's
error at that tau.  Densities recorded are the means over the prompts at the chosen taus.  The summary also
gives the best single GLOBAL tau (the largest that qualifies for every layer and head) and its density.
Prompts are key-value retrieval samples of held-out text (``sgl_slim.testbed.data``).  Needs torch,
transformers and tokenizers; never imports sglang.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from sgl_slim.attention import VARIANTS

LADDER = (0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _per_kv_head(values: torch.Tensor, hkv: int) -> list[float]:
    return values.view(hkv, -1).mean(1).tolist()


def measure(qkv: dict[int, tuple], *, taus=LADDER, variant: str, block_size: int, segment_size: int):
    """err[layer][tau][h] (rel-L2 per KV head) and dens[layer][tau][h] for one prompt's q/k/v."""
    from sgl_slim.testbed.attn import _s2o  # noqa: PLC0415
    from sgl_slim.testbed.dump import dense_fp32  # noqa: PLC0415

    err, dens = {}, {}
    for layer, (q, k, v) in sorted(qkv.items()):
        T, hq, d = q.shape
        hkv = k.shape[1]
        scale = 1.0 / math.sqrt(d)
        ref = dense_fp32(q, k, v, scale)                                            # [T, Hq, D] fp32
        ref_norm = ref.view(T, hkv, -1).norm(dim=(0, 2))
        err[layer], dens[layer] = [], []
        for tau in taus:
            out, st = _s2o(q, k, v, tau=tau, variant=variant, block_size=block_size, segment_size=segment_size,
                           scale=scale)
            diff = (out.float() - ref).view(T, hkv, -1).norm(dim=(0, 2))
            err[layer].append((diff / ref_norm).tolist())
            per_head = st.get("density_per_head")
            dh = _per_kv_head(torch.tensor(per_head), hkv) if per_head is not None else [st["density"]] * hkv
            dens[layer].append(dh)
    return err, dens


def choose(errs: list[dict], denss: list[dict], *, taus, budget: float):
    """Per (layer, KV head) the largest tau of the qualifying prefix -> (taus [L][H], densities [L][H],
    global_tau, global_density)."""
    layers = sorted(errs[0])
    hkv = len(errs[0][layers[0]][0])
    ok = {(l, i, h): all(e[l][i][h] <= budget for e in errs)
          for l in layers for i in range(len(taus)) for h in range(hkv)}
    mean_d = {(l, i, h): sum(d[l][i][h] for d in denss) / len(denss)
              for l in layers for i in range(len(taus)) for h in range(hkv)}
    chosen_t, chosen_d = [], []
    for l in layers:
        row_t, row_d = [], []
        for h in range(hkv):
            best = 0
            for i in range(len(taus)):
                if not ok[(l, i, h)]:
                    break
                best = i
            row_t.append(float(taus[best]))
            row_d.append(min(1.0, max(0.0, mean_d[(l, best, h)])))
        chosen_t.append(row_t)
        chosen_d.append(row_d)
    g = 0
    for i in range(len(taus)):
        if not all(ok[(l, i, h)] for l in layers for h in range(hkv)):
            break
        g = i
    g_density = sum(mean_d[(l, g, h)] for l in layers for h in range(hkv)) / (len(layers) * hkv)
    return chosen_t, chosen_d, float(taus[g]), g_density


def calibrate(model, prompts: list[torch.Tensor], *, model_name: str, error_budget: float, variant: str = "v2",
              block_size: int | None = None, segment_size: int | None = None, taus=LADDER):
    """-> (S2OCalibration, summary dict)."""
    from sgl_slim.attention.calibration import S2OCalibration  # noqa: PLC0415
    from sgl_slim.testbed.attn import s2o_defaults  # noqa: PLC0415
    from sgl_slim.testbed.dump import capture_qkv  # noqa: PLC0415

    bs, ss = s2o_defaults()
    block_size, segment_size = block_size or bs, segment_size or ss
    errs, denss = [], []
    for ids in prompts:
        qkv = capture_qkv(model, ids)
        e, d = measure(qkv, taus=taus, variant=variant, block_size=block_size, segment_size=segment_size)
        errs.append(e)
        denss.append(d)
        del qkv
    t, d, g_tau, g_density = choose(errs, denss, taus=taus, budget=error_budget)
    cfg = model.config
    cal = S2OCalibration(model=model_name, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.head_dim, error_budget=error_budget, block_size=block_size,
                         segment_size=segment_size, variant=variant, taus=t, densities=d)
    mean_density = sum(sum(r) for r in d) / (len(d) * len(d[0]))
    summary = {"bench": "testbed_calibration", "error_budget": error_budget, "variant": variant,
               "block_size": block_size, "segment_size": segment_size, "length": int(prompts[0].numel()),
               "prompts": len(prompts), "taus": t, "densities": d, "mean_density": mean_density,
               "layer_density": [sum(r) / len(r) for r in d], "global_tau": g_tau,
               "global_density": g_density, "density_ratio_global_over_calibrated":
                   g_density / mean_density if mean_density else None,
               "ladder": list(taus),
               "errors": {str(l): errs[0][l] for l in sorted(errs[0])}}
    return cal, summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face Llama-style checkpoint directory")
    ap.add_argument("--error-budget", type=float, required=True, help="rel-L2 of each layer's attention output")
    ap.add_argument("--length", type=int, default=16384, help="calibration prompt length (tokens)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--variant", default="v2", choices=sorted(VARIANTS))
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--segment-size", type=int, default=None)
    ap.add_argument("--out", default=None, help="calibration file (default: MODEL/s2o_calibration.json)")
    ap.add_argument("--summary", default=None, help="append the summary as a JSON line here")
    args = ap.parse_args(argv)
    if not 0 < args.error_budget < 1:
        raise SystemExit(f"--error-budget must be in (0, 1), got {args.error_budget}")
    from transformers import AutoTokenizer  # noqa: PLC0415

    from sgl_slim.testbed.dump import long_prompt  # noqa: PLC0415
    from sgl_slim.testbed.model import load_model  # noqa: PLC0415

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [long_prompt(tokenizer, args.length, seed=100 + i).to(device) for i in range(args.prompts)]
    cal, summary = calibrate(model, prompts, model_name=Path(args.model).resolve().name,
                             error_budget=args.error_budget, variant=args.variant, block_size=args.block_size,
                             segment_size=args.segment_size)
    out = Path(args.out) if args.out else Path(args.model) / "s2o_calibration.json"
    cal.save(out)
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}))
    print(f"wrote {out}")
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
