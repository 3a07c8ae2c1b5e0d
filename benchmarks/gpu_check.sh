#!/usr/bin/env bash
# The prepared GPU check (issue 16): every GPU figure the README waits for, in at most
# 9 minutes on one lent GPU, written to benchmarks/results/ (see benchmarks/gpu_check.py).
#
# Before the call, on a machine with PyPI:   bash benchmarks/fetch_gpu_wheels.sh
# The device call, one, from the repository's root on the GPU machine:
#     command:  bash benchmarks/gpu_check.sh
#     carry:    src/ benchmarks/ (with benchmarks/wheels/) tests/ pyproject.toml
#     bring back: benchmarks/results/ (gpu_check_cuda.json lists every file it wrote)
# Checked beforehand on the CPU (tiny sizes, under 3 minutes):
#     bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! "$PY" -c "import pydantic, torchjd" 2>/dev/null; then
  # the image cannot install from a registry: unpack the carried wheels (a wheel is a zip of
  # its installed files) into one folder on the path; no pip needed
  ls benchmarks/wheels/*.whl >/dev/null 2>&1 ||
    { echo "error: pydantic/torchjd missing and no benchmarks/wheels/*.whl;" \
           "run benchmarks/fetch_gpu_wheels.sh first" >&2; exit 2; }
  vendor="$PWD/benchmarks/wheels/site"
  for wheel in benchmarks/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$vendor"; done
  export PYTHONPATH="$vendor${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the script keeps to its 540 s budget by itself; this is the backstop if something hangs
exec timeout -k 15 570 "$PY" benchmarks/gpu_check.py "$@"
