"""Build BENCHMARKS.md: the summary and goals table (benchmarks/_summary.md) and a link to each topic's own page
(benchmarks/<topic>.md, which holds its tables, commands, machines and plots).

    python -m benchmarks.build_md
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ["s2o", "serving_gpu", "testbed", "idpruner", "samp", "eagle", "serving"]


def _title(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return path.stem


def main() -> None:
    parts = [(HERE / "_summary.md").read_text().rstrip() + "\n", "## Pages\n"]
    for name in SECTIONS:
        path = HERE / f"{name}.md"
        if path.is_file():
            parts.append(f"- [{_title(path)}](benchmarks/{name}.md)")
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
