#!/usr/bin/env bash
# Install sgl_slim and what it needs (sglang 0.5.23, torch 2.14.1, ...) into a virtual environment.
# ~6-8 minutes and ~11 GB the first time; seconds afterwards (the venv is reused when it already has the pins).
# SGL_SLIM_VENV chooses the venv (default: ~/.cache/sgl_slim/venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${SGL_SLIM_VENV:-$HOME/.cache/sgl_slim/venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "sgl_slim: creating $venv" >&2
  "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '0.5.23')" 2>/dev/null \
   || ! "$venv/bin/python" -c "import pytest, openai, hypothesis, soundfile, torchaudio, PIL, matplotlib, decord" 2>/dev/null; then
  echo "sgl_slim: installing sglang 0.5.23 and test tools (first time: ~6-8 min, ~11 GB)" >&2
  "$venv/bin/pip" install --quiet "$root[test]"
fi
# Point the venv's sgl_slim (and its SGLang plugin entry point) at this checkout, unless it already does.
if ! (cd / && "$venv/bin/python" - "$root" <<'PY' 2>/dev/null); then
import importlib.metadata as m, pathlib, sys, sgl_slim
assert pathlib.Path(sgl_slim.__file__).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve()
assert {"sgl_slim", "sgl_slim_gpu_standins"} <= {ep.name for ep in m.entry_points(group="sglang.srt.plugins")}
assert m.version("sgl-slim") == [l.split('"')[1] for l in open(pathlib.Path(sys.argv[1]) / "pyproject.toml") if l.startswith("version")][0]
PY
  "$venv/bin/pip" install --quiet --no-deps -e "$root" >&2
fi
echo "$venv/bin/python"
