"""Tables, matched comparisons and a plot from the S2O benchmark results (CPU only).

    python -m benchmarks.s2o_report   # reads benchmarks/results/s2o_{quality,speed}.jsonl

Matched comparisons interpolate S2O's tau sweep (log10 MSE linear in density between neighbouring points):
  * MSE at matched density: for a baseline point (density d, MSE m): m / MSE_s2o(d);
  * density at matched MSE: d / density_s2o(m).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from benchmarks.harness import markdown_table, read_results

RES = Path(__file__).resolve().parent / "results"


def _curve(rows):
    pts = sorted((r["density"], r["mse"]) for r in rows)
    return pts


def _interp_mse_at_density(pts, d):
    for (d0, m0), (d1, m1) in zip(pts, pts[1:]):
        if d0 <= d <= d1 and d1 > d0:
            f = (d - d0) / (d1 - d0)
            return 10 ** (math.log10(m0) + f * (math.log10(m1) - math.log10(m0)))
    return None


def _interp_density_at_mse(pts, m):
    by_mse = sorted(pts, key=lambda p: p[1])
    for (d0, m0), (d1, m1) in zip(by_mse, by_mse[1:]):
        if m0 <= m <= m1 and m1 > m0:
            f = (math.log10(m) - math.log10(m0)) / (math.log10(m1) - math.log10(m0))
            return d0 + f * (d1 - d0)
    return None


def quality_tables():
    env, rows = read_results(RES / "s2o_quality.jsonl")
    groups = defaultdict(list)
    for r in rows:
        if r["method"] == "dense_cudnn_bf16":
            continue
        groups[(r["L"], r["method"], r["block_size"], r["segment_size"], r["group_reduce"], r["n_sample"],
                r["recent"])].append(r)
    out = []
    matched = []
    for (L, method, bs, ss, gr, ns, rc), rs in sorted(groups.items()):
        if method != "pbs" and method != "topcdf":
            continue
        s2o = groups.get((L, "s2o", bs, 512, "max", 0, 0))
        if not s2o:
            continue
        pts = _curve(s2o)
        for r in sorted(rs, key=lambda r: r["knob"]):
            if r["density"] >= 0.999:
                continue
            m_s = _interp_mse_at_density(pts, r["density"])
            d_s = _interp_density_at_mse(pts, r["mse"])
            matched.append({"L": L, "baseline": method, "block": bs, "segment": ss, "gamma": str(r["knob"]),
                            "base_density": r["density"], "base_mse": r["mse"], "base_rel_l2": r["rel_l2"],
                            "s2o_mse_at_density": m_s, "mse_ratio": (r["mse"] / m_s) if m_s else None,
                            "s2o_density_at_mse": d_s, "density_ratio": (r["density"] / d_s) if d_s else None})
    out.append("### Matched comparisons (S2O tau sweep vs baseline knob sweep, same block size, segment 512)\n")
    out.append(markdown_table(matched, ["L", "baseline", "block", "segment", "gamma", "base_density", "base_rel_l2",
                                        "base_mse", "s2o_mse_at_density", "mse_ratio", "s2o_density_at_mse",
                                        "density_ratio"], floatfmt=".3g"))
    sweep = [r for r in rows if r["method"] == "dense_cudnn_bf16" or (
        r["segment_size"] in (512, 2048) and r["group_reduce"] == "max" and r["n_sample"] == 0
        and (r["method"] != "s2o" or r["recent"] == 0))]
    out.append("\n### Quality sweeps (rel-L2 and MSE vs fp32 dense; density = computed / causal score blocks)\n")
    out.append(markdown_table(sweep, ["L", "method", "block_size", "segment_size", "knob", "density", "rel_l2", "mse"],
                              floatfmt=".3g"))
    abl = [r for r in rows if r["L"] == 8192 and r["method"] == "s2o" and r["block_size"] == 64
           and r["segment_size"] == 512]
    out.append("\n### Estimator ablation at 8K (block 64, segment 512)\n")
    out.append(markdown_table(abl, ["group_reduce", "n_sample", "recent", "knob", "density", "rel_l2", "mse"],
                              floatfmt=".3g"))
    return "\n".join(out), env, groups


def speed_table():
    env, rows = read_results(RES / "s2o_speed.jsonl")
    cudnn = {r["L"]: r["ms"] for r in rows if r["method"] == "cudnn"}
    fa2 = {r["L"]: r["ms"] for r in rows if r["method"] == "fa2"}
    for r in rows:
        r["x_vs_cudnn"] = cudnn[r["L"]] / r["ms"]
        r["x_vs_fa2"] = fa2[r["L"]] / r["ms"]
        r["index_share"] = (r.get("index_ms") or 0) / r["ms"]
    cols = ["L", "method", "knob", "block_size", "segment_size", "ms", "index_ms", "index_share", "x_vs_cudnn",
            "x_vs_fa2", "density", "rel_l2", "ref"]
    return markdown_table(rows, cols, floatfmt=".3g"), env


def plot(groups, path):
    """Density (x) vs log10 MSE (y), one panel per length; drawn with Pillow (no matplotlib here)."""
    from PIL import Image, ImageDraw
    lengths = sorted({k[0] for k in groups})
    W, H, pad = 520, 420, 60
    img = Image.new("RGB", (W * len(lengths), H), "white")
    dr = ImageDraw.Draw(img)
    series = [("s2o", 64, (200, 30, 30)), ("s2o", 128, (240, 140, 40)), ("pbs", 64, (30, 90, 200)),
              ("pbs", 128, (90, 170, 240)), ("topcdf", 64, (40, 150, 60))]
    lo, hi = -6.0, -1.0
    for i, L in enumerate(lengths):
        x0 = i * W
        dr.rectangle([x0 + pad, 20, x0 + W - 20, H - pad], outline="black")
        dr.text((x0 + W // 2 - 60, 4), f"L = {L}: MSE vs density", fill="black")
        for t in range(int(lo), int(hi) + 1):
            y = H - pad - (t - lo) / (hi - lo) * (H - pad - 20)
            dr.text((x0 + 8, y - 6), f"1e{t}", fill="black")
        for t in range(0, 11, 2):
            x = x0 + pad + t / 10 * (W - pad - 20)
            dr.text((x - 8, H - pad + 6), f"{t / 10:.1f}", fill="black")
        dr.text((x0 + W // 2 - 20, H - 30), "density", fill="black")
        for j, (m, bs, col) in enumerate(series):
            rs = groups.get((L, m, bs, 512, "max", 0, 0))
            if not rs:
                continue
            pts = []
            for d, mse in _curve(rs):
                y = H - pad - (min(max(math.log10(mse), lo), hi) - lo) / (hi - lo) * (H - pad - 20)
                pts.append((x0 + pad + d * (W - pad - 20), y))
            dr.line(pts, fill=col, width=2)
            for p in pts:
                dr.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
            dr.text((x0 + pad + 10, 26 + 14 * j), f"{m} block {bs}", fill=col)
    img.save(path)


def main():
    q, qenv, groups = quality_tables()
    s, senv = speed_table()
    plot(groups, RES / "s2o_quality.png")
    text = (f"<!-- generated by python -m benchmarks.s2o_report; quality env: {qenv}; speed env: {senv} -->\n\n"
            f"## Speed (H200, bf16, 32 q heads / 8 KV heads / d 128, one causal sequence)\n\n{s}\n{q}\n")
    (RES / "s2o_tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
