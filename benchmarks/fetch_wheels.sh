#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, triton, pytest, pytest-benchmark, safetensors and
# numpy, and no network), for its Python 3.12: run this on a machine with network, from the
# repository root, then carry wheels/ (git-ignored, ~11 MB) with the GPU run; gpu_check.sh
# installs what it finds there before the tests.
set -euo pipefail
rm -rf wheels
python -m pip download --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d wheels \
    tokenizers tqdm pillow webdataset braceexpand pyyaml ftfy wcwidth regex
ls -l wheels
