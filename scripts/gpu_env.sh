# Sourced by the one-command GPU benchmarks (scripts/gpu_*_bench.sh) with the caller's name as $1 and the checkout
# in $root: install the carried wheels (scripts/gpu_install.sh) unless SGLang already imports, put the checkout and
# that install on PYTHONPATH, cd to the checkout and name the GPU. Sets py (the Python to run) and t0 (the start).
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
t0=$(date +%s)
if "$py" -c "import sglang" 2>/dev/null; then
  echo "$1: SGLang already importable, nothing installed"
else
  site="$("$root/scripts/gpu_install.sh")"
  echo "$1: installed into $site in $(( $(date +%s) - t0 )) s"
  export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
