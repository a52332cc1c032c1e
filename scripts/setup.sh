#!/usr/bin/env bash
# Create .venv and install dapo with its development tools, Ray (the cluster mode, trainer.backend=ray) and wandb (logging.wandb). torch is pinned to 2.13.0 first (a CPU wheel on these machines),
# and the constraint file keeps every later install from replacing it (an unpinned torch pulls GBs of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
PIP_CONSTRAINT="$PWD/scripts/constraints.txt" .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,ray,wandb]"
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
