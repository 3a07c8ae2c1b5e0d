#!/usr/bin/env bash
# The packages mtpsl needs that the lent GPU's image lacks (it has torch 2.11, torchvision,
# timm, numpy, scipy, matplotlib, tensorboard, tqdm, pyyaml, pillow, pytest, hypothesis; it
# cannot reach a registry), as CPython 3.12 manylinux x86_64 wheels in benchmarks/wheels/
# (git-ignored), for gpu_check.sh to carry and unpack. Needs PyPI; takes a few seconds.
#
#   bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# pydantic and its four dependencies (pydantic-core is pinned by pydantic), torchjd without its
# torch, and the solvers of torchjd's projector (upgrad, dualproj: the `solvers` extra)
$PY -m pip download --quiet --dest benchmarks/wheels --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --no-deps \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
  typing-inspection==0.4.5 torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14
ls benchmarks/wheels
