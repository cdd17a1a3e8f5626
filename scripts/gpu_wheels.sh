#!/usr/bin/env bash
# Download, here, everything a GPU host without network needs to serve sgl_slim through SGLang when the
# compiled sgl_kernel library cannot be used there (another torch; the wheel is 1.2 GB unpacked anyway):
#   .whl/*.whl              sglang 0.5.23 and the small pure-Python / cp312 wheels it imports that such a
#                           host's image lacks, at pinned versions (--no-deps: exactly these, one of each);
#   .whl/extra/sgl_kernel/  the Python wrappers of the sglang-kernel 0.4.10 wheel, WITHOUT its compiled
#                           libraries (extracted from the wheel here; sgl_slim's stand-in ops replace them);
#   .whl/extra/...          a dist-info naming that version, and a stub for an import a model never uses.
# The folder is ignored by git; it travels to the GPU host beside the working tree (about 50 MiB).
# There, scripts/gpu_install.sh installs it. Environment: PYTHON (a python with pip, default python3),
# GPU_PY (the GPU host's Python version, default 3.12), WHL_DIR (default .whl in the checkout).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${WHL_DIR:-$root/.whl}"
py="${PYTHON:-python3}"
gpu_py="${GPU_PY:-3.12}"
SGL_KERNEL_VERSION=0.4.10

# name==version, as SGLang 0.5.23 resolved them on a full install (its pins where it has them)
PINS=(
  sglang==0.5.23
  annotated-types==0.8.0 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 dill==0.4.1 distro==1.9.0
  fastapi==0.165.0 gguf==0.19.0 interegular==0.3.3 jiter==0.19.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 loguru==0.7.3 msgspec==0.23.0 openai==2.8.0 opentelemetry-api==1.45.2
  orjson==3.13.0 partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5
  python-multipart==0.0.34 pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1 setproctitle==1.3.8
  sniffio==1.3.1 starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.55.0 xgrammar==0.2.7
  soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
)
PLATFORMS=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$out"
rm -f "$out"/*.whl
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$gpu_py" --implementation cp \
  "${PLATFORMS[@]}" -d "$out" "${PINS[@]}"

# sgl_kernel's Python wrappers from its wheel (the wheel itself is not kept: ~1 GB of compiled code)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$gpu_py" --implementation cp \
  "${PLATFORMS[@]}" -d "$tmp" "sglang-kernel==$SGL_KERNEL_VERSION"
rm -rf "$out/extra"
mkdir -p "$out/extra"
"$py" - "$tmp"/sglang_kernel-*.whl "$out/extra" "$SGL_KERNEL_VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("sgl_kernel/") and n.endswith(".py")]
    for n in names:
        z.extract(n, dest)
info = dest / f"sglang_kernel-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sglang-kernel\nVersion: {version}\n"
                               "Summary: Python wrappers only (compiled libraries replaced by sgl_slim's stand-ins)\n")
(info / "RECORD").write_text("")
# A stub: SGLang imports IPython.display at module level and never calls it.
ipy = dest / "IPython"
ipy.mkdir()
(ipy / "__init__.py").write_text('"""Stub (sgl_slim GPU stand-in mode): SGLang imports IPython.display only."""\n')
(ipy / "display.py").write_text(
    '"""Stub (sgl_slim GPU stand-in mode)."""\n\n\nclass HTML(str):\n    pass\n\n\n'
    'def display(*args, **kwargs):\n    raise RuntimeError("IPython is not installed (sgl_slim GPU stand-in mode stub)")\n')
print(f"{len(names)} sgl_kernel Python files extracted")
PY
du -sh "$out" | sed 's/^/gpu_wheels: /'
ls "$out"/*.whl | wc -l | sed 's/^/gpu_wheels: wheels: /'
