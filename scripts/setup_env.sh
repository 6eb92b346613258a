#!/usr/bin/env bash
# Create (or reuse) the virtual environment nnunetv2-dsm runs in, install the package into it, print its path.
#   NNUNETV2_DSM_VENV   where the venv lives (default: ~/.cache/nnunetv2-dsm/venv); kept between runs
#   NNUNETV2_DSM_TORCH  the torch requirement installed before nnunetv2 (default: the CPU-capable pair below)
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together with nnunetv2 2.8 (see README, "Install").
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NNUNETV2_DSM_VENV:-$HOME/.cache/nnunetv2-dsm/venv}"
torch_req="${NNUNETV2_DSM_TORCH:-torch==2.14.1 torchvision==0.29.1}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating venv $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools >&2
fi
if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $torch_req (a few minutes the first time)" >&2
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $torch_req >&2
fi
echo "[setup] installing nnunetv2-dsm from $repo" >&2
"$venv/bin/pip" install -q -e "$repo[test]" >&2   # editable: the venv runs this source tree
echo "$venv"
