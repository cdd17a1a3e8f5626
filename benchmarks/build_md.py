"""Stitch BENCHMARKS.md from the summary and each benchmark's own section (benchmarks/<topic>.md).

    python -m benchmarks.build_md
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ["s2o", "testbed", "idpruner", "samp", "eagle", "serving"]


def main() -> None:
    parts = [(HERE / "_summary.md").read_text().rstrip() + "\n"]
    for name in SECTIONS:
        path = HERE / f"{name}.md"
        if path.is_file():
            # links inside a section are relative to benchmarks/: make them relative to the repo root
            text = path.read_text().replace("](results/", "](benchmarks/results/")
            parts.append(text.rstrip() + "\n")
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
