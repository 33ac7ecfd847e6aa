#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with the wheels that bench/gpu_check.sh installs on the bare GPU
# machine (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, no package index). Run it HERE, where PyPI
# is reachable, before the device run:
#
#   bash bench/gpu_wheels.sh [DIR]        # DIR defaults to .gpu_wheels
#
# What the machine lacks (read off its package list): megatron-core, deepspeed (an sdist: built into a
# pure-Python wheel here), webdataset, wids, braceexpand, submitit, hjson, pydantic (+ pydantic-core,
# annotated-types, typing-inspection; typing-extensions and packaging at the versions pydantic and
# megatron-core need) and fla-core. It has torch, triton, numpy, einops, ninja,
# py-cpuinfo, msgpack, psutil, tqdm, pyyaml and cloudpickle, so those do
# not travel; the triton wheel in particular must not (fla-core's triton>=3.3 is met by the machine's
# 3.6: gpu_check.sh installs with --no-deps). The folder travels with the working tree (64 MiB in all),
# so the script fails if it grows past WHEELS_MAX_MIB (default 40).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$REPO/.gpu_wheels}
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
MAX_MIB=${WHEELS_MAX_MIB:-40}

# One version of each (two of one name would stop the install there). megatron-core as pyproject pins
# it (>=0.16,<0.17); the rest as verified together on the development machines.
BINARY=(
    "megatron-core==0.16.1"
    "webdataset==1.0.2"
    "wids==0.1.11"
    "braceexpand==0.1.7"
    "submitit==1.5.4"
    "hjson==3.1.0"
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"  # pydantic needs >= 4.16; the machine's may be older
    "packaging==26.4"  # megatron-core needs >= 24.2
    "fla-core==0.6.0"
)
DEEPSPEED="deepspeed==0.19.8"

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DIR" "${BINARY[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# DeepSpeed ships only an sdist: build its pure-Python wheel (no ops compiled: they JIT on the machine)
# against the torch of this environment (no build isolation, so pip fetches no torch).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$DEEPSPEED" \
    2> >(grep -v "is ignored: it is neither" >&2)

if compgen -G "$DIR/triton-*" >/dev/null; then
    echo "gpu_wheels: a triton wheel is in $DIR; it must not travel (the machine's triton serves)" >&2
    exit 1
fi
wheels=("$DIR"/*.whl)
count=${#wheels[@]}
mib=$(du -sm "$DIR" | cut -f1)
echo "gpu_wheels: $count wheels, ${mib} MiB in $DIR"
ls -1 "$DIR"
if [ "$mib" -gt "$MAX_MIB" ]; then
    echo "gpu_wheels: $DIR is ${mib} MiB, over WHEELS_MAX_MIB=$MAX_MIB (the working tree travels in 64 MiB)" >&2
    exit 1
fi
