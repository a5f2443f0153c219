# Sourced by the GPU scripts (gpu_decode_grid.sh, gpu_migration_pacing.sh, ...) on the device machine: torch and Triton
# are preinstalled there; pydantic and gguf come as wheels in .whl/ (carried with the run), and where carried, Ray and
# the server's needs in .whl2/ (how to make them: gpu_serve_nccl.sh), installed once into /tmp/site.
# Sets OUT (what comes back), L (the bench CLI), G (h100 / h200: the GPU's file prefix) and run STEP (true when the
# script was asked for STEP or for all). Expects WHAT (the step asked for) to be set.
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" benchmarks
if [ -d .whl ] && ! PYTHONPATH="/tmp/site:${PYTHONPATH:-}" python3 -c "import pydantic, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d .whl2 ] && ! PYTHONPATH="/tmp/site:${PYTHONPATH:-}" python3 -c "import ray, fastapi" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl2/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
L="python3 -m llumnix.bench.cli"
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
run() { [ "$WHAT" = all ] || [ "$WHAT" = "$1" ]; }
