"""IDPruner quality proxy (real VLM weights cannot be evaluated here).

    python -m benchmarks.idpruner_quality --out benchmarks/results/idpruner_quality.jsonl

Synthetic "scenes" shaped like merged vision tokens: an H x W grid whose background is a smooth,
low-frequency feature field (large, redundant regions, as sky/walls are), a few objects (rectangles with
their own feature direction and texture: the tokens a VQA answer needs), and a few high-norm "artifact"
background tokens (the register-like outliers real ViTs show). Per selection we report
- coverage: mean over all tokens of the max cosine similarity to a kept token (and its worst case);
- object recall: share of object tokens kept, and share of objects with at least one kept token;
- importance mass retained, under the importance signal the selection used.
Compared at the same keep ratios: IDPruner (MMR, lambda 0.5) with each training-free importance signal,
top-k importance, random, and DivPrune-style max-min diversity.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from benchmarks.harness import env_info, markdown_table, record, write_results
from sgl_slim.vision import compute_importance, idpruner_select
from sgl_slim.vision.quality import coverage, importance_mass, select_maxmin, select_random, select_topk


def make_scene(seed: int, h: int = 32, w: int = 32, d: int = 256, n_objects: int = 5, n_artifacts: int = 6):
    """features [h*w, d], object_id [h*w] (-1 = background)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    # background: a few smooth spatial modes, each with its own feature direction
    feats = torch.zeros(h, w, d)
    for _ in range(4):
        fy, fx, ph = torch.rand(3, generator=g) * torch.tensor([2.0, 2.0, 6.28])
        field = torch.cos(math.pi * (fy * ys + fx * xs) + ph)                 # [h, w]
        feats += field[..., None] * torch.randn(d, generator=g)
    feats += 3.0 * torch.randn(d, generator=g)                                # shared background tone
    obj = torch.full((h, w), -1, dtype=torch.long)
    for o in range(n_objects):
        oh, ow = torch.randint(3, 8, (2,), generator=g).tolist()
        y0, x0 = torch.randint(0, h - oh, (1,), generator=g).item(), torch.randint(0, w - ow, (1,), generator=g).item()
        direction = torch.randn(d, generator=g)
        direction *= feats.norm(dim=-1).mean() / direction.norm()             # same scale as the background
        feats[y0:y0 + oh, x0:x0 + ow] = direction + 0.6 * torch.randn(oh, ow, d, generator=g) * direction.norm() / math.sqrt(d)
        obj[y0:y0 + oh, x0:x0 + ow] = o
    feats += 0.5 * torch.randn(h, w, d, generator=g)                          # token noise
    flat, obj = feats.reshape(h * w, d), obj.reshape(-1)
    bg = torch.nonzero(obj < 0)[:, 0]
    art = bg[torch.randperm(bg.numel(), generator=g)[:n_artifacts]]
    flat[art] *= 4.0                                                          # register-like outliers
    return flat, obj


def evaluate(features, obj, kept, importance) -> dict:
    is_obj = obj >= 0
    kept_mask = torch.zeros_like(is_obj)
    kept_mask[kept] = True
    objects = obj[is_obj].unique()
    hit = sum(bool((kept_mask & (obj == o)).any()) for o in objects.tolist())
    return {
        "coverage": coverage(features, kept),
        "coverage_min": coverage(features, kept, reduce="min"),
        "object_token_recall": float((kept_mask & is_obj).sum()) / float(is_obj.sum()),
        "objects_hit": hit / len(objects),
        "importance_mass": importance_mass(importance, kept) if importance is not None else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--keep-ratios", default="0.5,0.25,0.1")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for ratio in [float(r) for r in args.keep_ratios.split(",")]:
        acc: dict[str, list[dict]] = {}
        for seed in range(args.scenes):
            feats, obj = make_scene(seed)
            n = feats.shape[0]
            keep = max(1, round(n * ratio))
            imps = {kind: compute_importance(feats, kind) for kind in ("norm", "distinct", "attn")}
            methods = {f"idpruner[{k}]": (idpruner_select(feats, imp, keep), imp) for k, imp in imps.items()}
            methods.update({f"topk[{k}]": (select_topk(imp, keep), imp) for k, imp in imps.items()})
            methods["random"] = (select_random(n, keep, seed=seed), None)
            methods["maxmin (DivPrune)"] = (select_maxmin(feats, keep), None)
            for name, (kept, imp) in methods.items():
                acc.setdefault(name, []).append(evaluate(feats, obj, kept, imp))
        for name, results in acc.items():
            mean = {key: (sum(r[key] for r in results) / len(results) if results[0][key] is not None else None)
                    for key in results[0]}
            rows.append(record("idpruner_quality", method=name, keep_ratio=ratio, tokens=1024,
                               kept=max(1, round(1024 * ratio)), scenes=args.scenes, **mean))
            print(rows[-1], flush=True)
    write_results(args.out, rows, env=env_info())
    print(markdown_table(rows, ["keep_ratio", "kept", "method", "coverage", "coverage_min", "object_token_recall",
                                "objects_hit", "importance_mass"], floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
