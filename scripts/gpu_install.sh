#!/usr/bin/env bash
# On a GPU host without network whose torch the compiled sgl_kernel does not match: install what
# scripts/gpu_wheels.sh downloaded (.whl/, carried beside the checkout) and this checkout (for its SGLang plugin
# entry points) into a folder, and print that folder. Then serve with
#   PYTHONPATH=<checkout>:<folder> python3 -m sgl_slim.launch --model-path M [--s2o ...]
# (scripts/gpu_serve.sh does both). The launcher sees an sgl_kernel without its compiled library and switches
# to the GPU stand-in mode (sgl_slim/standins/gpu.py). A few seconds; nothing is downloaded.
# Environment: PYTHON (default python3, the host's python with torch), SGL_SLIM_SITE (default /tmp/sgl_slim_site).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
site="${SGL_SLIM_SITE:-/tmp/sgl_slim_site}"
py="${PYTHON:-python3}"
if ! ls "$root"/.whl/*.whl >/dev/null 2>&1 || [ ! -d "$root/.whl/extra/sgl_kernel" ]; then
  echo "gpu_install: $root/.whl is missing or incomplete: run scripts/gpu_wheels.sh where pip reaches PyPI" >&2
  exit 1
fi
pip_install=("$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site")
"${pip_install[@]}" "$root"/.whl/*.whl
cp -r "$root/.whl/extra/." "$site/"
"${pip_install[@]}" --no-build-isolation "$root" >&2
echo "$site"
