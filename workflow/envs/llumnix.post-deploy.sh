#!/usr/bin/env bash
# Install the llumnix package (without its heavy optional runtime dependencies) into the conda environment.
set -euo pipefail
pip install --no-deps -e .
