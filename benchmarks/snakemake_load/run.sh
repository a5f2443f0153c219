#!/usr/bin/env bash
# Snakemake's own CPU while one job takes every core and others wait (as the real cluster's runs do in
# `make reproduce`): each `long` job prints the cores every process but itself used over 15 s (as the real runs'
# disturbance check counts them). Run from the repo root with the venv active:
#   PATH=$PWD/.venv/bin:$PATH bash benchmarks/snakemake_load/run.sh
# It works in a temporary directory and prints one line per scheduler setting: the three long jobs' values.
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
for opts in "" "--max-jobs-per-timespan 10000/100s" "--max-jobs-per-timespan 10000/100s --scheduler greedy"; do
  work=$(mktemp -d)
  cp "$src/Snakefile" "$work/"
  (cd "$work" && snakemake --cores 2 -q $opts > /dev/null 2>&1)
  echo "[${opts:-defaults}] $(cat "$work"/long0.txt) $(cat "$work"/long1.txt) $(cat "$work"/long2.txt)"
  rm -rf "$work"
done
