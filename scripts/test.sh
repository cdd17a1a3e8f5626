#!/usr/bin/env bash
# Install (if needed) and run the test suite: unit tests, Triton kernels under TRITON_INTERPRET=1, and end-to-end
# tests that start real SGLang servers on the CPU. GPU tests skip without CUDA. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/scripts/install.sh")"
cd "$root"
exec "$python" -m pytest -ra --durations=25 "$@" tests
