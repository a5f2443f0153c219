#!/usr/bin/env bash
# `llumnix serve --kv-transport nccl` on two GPUs, through Ray: the serving test of tests/test_dist_transport.py with
# its nccl parameter (two instance actors, one per GPU, LLaMA-7B's shape in bf16; migrations there and back over NCCL,
# a broken channel aborting to the source, tokens equal to an unmigrated run's, no leaked block).
#
# The GPU machines here have torch but no Ray; the wheels travel with the call (64 MiB limit), so Ray's wheel goes
# without the parts llumnix never imports (Java jars, RLlib, Tune, Train, Data, Serve, LLM: 79 -> 42 MB). Prepare on
# the development machine, from the repo root (/.whl2/ in .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d /tmp/raywhl ray==2.60.0
#   strip it into .whl2/ (the snippet below)
#   pip download --no-deps ... -d .whl2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
#     rpds-py==2026.9.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 \
#     opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
#     opentelemetry-exporter-prometheus==0.66b2
# Run on the machine (carry .whl and .whl2): bash benchmarks/gpu_serve_nccl.sh (benchmarks/gpu_env.sh installs both)
# Stripping the wheel (keeps every other file, its zip attributes, and RECORD without the dropped lines):
#   python3 - SRC DST_DIR <<'PY'
#   import sys, zipfile, pathlib
#   drop = ('ray/jars/', 'ray/rllib/', 'ray/tune/', 'ray/train/', 'ray/data/', 'ray/serve/', 'ray/llm/')
#   src = zipfile.ZipFile(sys.argv[1]); dst = pathlib.Path(sys.argv[2]) / pathlib.Path(sys.argv[1]).name
#   with zipfile.ZipFile(dst, 'w', zipfile.ZIP_DEFLATED) as out:
#       for info in src.infolist():
#           if info.filename.startswith(drop): continue
#           data = src.read(info)
#           if info.filename.endswith('RECORD'):
#               data = ''.join(l + '\n' for l in data.decode().splitlines() if not l.startswith(drop)).encode()
#           out.writestr(info, data)
#   PY
set -eu
WHAT=serve
. benchmarks/gpu_env.sh
nvidia-smi -L
python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_dist_transport.py -k nccl --durations=3
