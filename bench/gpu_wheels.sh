#!/usr/bin/env bash
# Prepare, here, the wheels that bench.gpu_check needs and the GPU machine's image lacks, for Python 3.12 on
# x86-64 Linux, into .gpu-wheels/ (git-ignored; it travels to the GPU machine as a "carried" path, and
# bench/gpu_run.sh installs it there). Nothing can be fetched on that machine, and at most 64 MiB travels.
#
#     bash bench/gpu_wheels.sh            # about 20 s: ten downloads and one DeepSpeed build
#     then, on the GPU machine: bash bench/gpu_run.sh, with .gpu-wheels carried
#
# The GPU image has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate, safetensors, pyarrow,
# numpy (and so packaging, tqdm, psutil, pyyaml, tokenizers, huggingface-hub); it has no pydantic and no
# deepspeed. The check imports torch, transformers, tokenizers, pydantic and deepspeed (no prefect, mlflow, boto3),
# so this ships:
#   - pydantic and its dependencies (pydantic-core as the cp312 manylinux wheel);
#   - deepspeed, built here into a pure-Python wheel (DS_BUILD_OPS=0: no compiled ops; the check's optimizer is
#     torch's AdamW), and those of its runtime dependencies that the image lacks (hjson, ninja, py-cpuinfo,
#     msgpack, einops; numpy, packaging, psutil, tqdm come with accelerate and transformers).
# Not transformers (nor tokenizers, huggingface-hub): rlhf_core works with the image's 5.17. Under Python 3.12 with
# transformers 5.17.0 the check's tiny smoke passed (1 and 2 ranks, through bench/gpu_run.sh), and so did the
# rlhf_core tests that need no services (test_losses, test_world, test_phases, test_dpo, test_evaluation,
# test_alarms: 58 passed in 13 s).
# Each version is the one in the project's .venv (checked below when that venv is there).
#
# Measured here (2 cores): 11 wheels, 5.53 MiB in all (deepspeed 2.07, pydantic-core 2.16, pydantic 0.47, msgpack
# 0.45, ninja 0.17, the rest under 0.1 each), in 20 s, the DeepSpeed build 15 s of it.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.gpu-wheels
VENV_PYTHON=${VENV_PYTHON:-.venv/bin/python}  # builds DeepSpeed: needs torch, as DeepSpeed's setup.py imports it
DOWNLOAD=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0  # pydantic 2.14 needs >= 4.16; the image's (torch's) may be older
    hjson==3.1.0
    ninja==1.13.2
    py-cpuinfo==9.0.0
    msgpack==1.2.4
    einops==0.8.2
)
BUILD=(deepspeed==0.19.8)
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

start=$SECONDS
if [ -x "$VENV_PYTHON" ]; then  # every pin must be what the project's venv runs
    "$VENV_PYTHON" - "${DOWNLOAD[@]}" "${BUILD[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

wrong = []
for spec in sys.argv[1:]:
    name, pinned = spec.strip().split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = "not installed"
    if have != pinned:
        wrong.append(f"{name}: pinned {pinned}, the venv has {have}")
if wrong:
    sys.exit("bench/gpu_wheels.sh: pins differ from the venv's:\n  " + "\n  ".join(wrong))
EOF
fi

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
for spec in "${DOWNLOAD[@]}"; do  # one at a time, without dependencies: each is named above
    python3 -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$WHEELS" "$spec"
done
for spec in "${BUILD[@]}"; do
    DS_BUILD_OPS=0 "$VENV_PYTHON" -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation -w "$WHEELS" "$spec"
done
if python3 -c 'import sys, zipfile; sys.exit(not any(n.endswith(".so") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
    "$WHEELS"/deepspeed-*.whl; then
    echo "bench/gpu_wheels.sh: the DeepSpeed wheel holds compiled ops; build it with DS_BUILD_OPS=0" >&2
    exit 1
fi

ls -l "$WHEELS"/*.whl | awk '{printf "%10.2f MiB  %s\n", $5 / 2^20, $NF}'
total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
awk -v b="$total" -v n="$(ls "$WHEELS"/*.whl | wc -l)" -v s=$((SECONDS - start)) \
    'BEGIN { printf "%10.2f MiB  in all, %d wheels, in %d s\n", b / 2^20, n, s }'
if [ "$total" -gt $((48 * 2**20)) ]; then
    echo "bench/gpu_wheels.sh: over 48 MiB; at most 64 MiB travels with the checkout" >&2
    exit 1
fi
