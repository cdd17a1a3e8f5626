#!/usr/bin/env bash
# Install (if needed) and serve the embedded demo model with sgl_slim's toggles on (recipe launch/demo.toml).
# Extra arguments go to the launcher, e.g. `bash scripts/demo.sh --port 8000` or `--recipe demo-audio`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/scripts/install.sh")"
cd "$root"
has_recipe=0
for a in "$@"; do case "$a" in --recipe|--recipe=*) has_recipe=1;; esac; done
if [ "$has_recipe" = 1 ]; then exec "$python" -m sgl_slim.launch "$@"; fi
exec "$python" -m sgl_slim.launch --recipe demo "$@"
