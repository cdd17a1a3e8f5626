"""A plot of ``testbed_serve`` runs (CPU; no GPU needed): each server's median latency against the prompt length,
and its speed-up over the dense server of the same run, with the answers it lost beside each point.

    python -m benchmarks.testbed_serve_report --out benchmarks/results/testbed_serve_latency.png \\
        benchmarks/results/testbed_serve_32k_multi_n60.jsonl benchmarks/results/testbed_serve_64k_multi_n60.jsonl \\
        benchmarks/results/testbed_serve_128k_multi_n80.jsonl benchmarks/results/testbed_serve_128k_chunks_n40.jsonl
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from benchmarks.harness import read_results


def summaries(paths: list[str]) -> list[dict]:
    """The per-server summary rows of every run, each with ``speedup`` over its own run's dense server (the
    server named "dense") and ``run`` (the file it came from)."""
    out = []
    for path in paths:
        _, rows = read_results(path)
        rows = [r for r in rows if r.get("bench") == "testbed_serve"]
        dense = next(r for r in rows if r["server"] == "dense")
        out += [dict(r, run=path, speedup=dense["latency_s"] / r["latency_s"]) for r in rows]
    return out


def plot(rows: list[dict], out: str) -> None:
    """One line per server name over the lengths (one run per length: a server twice at a length is refused)."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = defaultdict(dict)
    for r in rows:
        if r["length"] in series[r["server"]]:
            raise ValueError(f"server {r['server']!r} appears twice at length {r['length']}: one run per length")
        series[r["server"]][r["length"]] = r
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, by_length) in enumerate(sorted(series.items())):
        pts = [by_length[n] for n in sorted(by_length)]
        lengths = [r["length"] // 1024 for r in pts]
        style = dict(marker="o", color=f"C{i}", label=name)
        ax_t.plot(lengths, [r["latency_s"] for r in pts], **style)
        if name != "dense":
            ax_s.plot(lengths, [r["speedup"] for r in pts], **style)
            for r, x in zip(pts, lengths):
                ax_s.annotate(f"lost {r['lost_vs_dense']}/{r['samples']}", (x, r["speedup"]), fontsize=7,
                              textcoords="offset points", xytext=(4, 2))
    ax_t.set(yscale="log", ylabel="median latency (s)", title="prefill + a few greedy tokens, through SGLang")
    ax_s.set(ylabel="speed-up over the run's dense server", title="speed-up (label: answers lost / prompts)")
    ticks = sorted({r["length"] // 1024 for r in rows})
    for ax in (ax_t, ax_s):
        ax.set(xscale="log", xlabel="prompt length (K tokens)")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_yticks([0.1, 0.2, 0.5, 1, 2], ["0.1", "0.2", "0.5", "1", "2"])
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="testbed_serve result files")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    rows = summaries(args.results)
    plot(rows, args.out)
    for r in rows:
        print(f"{r['length']:>7} {r['server']:<55} {r['latency_s']:.3f} s  {r['speedup']:.2f}x  "
              f"lost {r['lost_vs_dense']} gained {r['gained_vs_dense']} of {r['samples']}")


if __name__ == "__main__":
    main()
