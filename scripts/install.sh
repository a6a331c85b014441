#!/usr/bin/env bash
# Install openmoe-train's environment into ./.venv (or $VENV) on a fresh machine.
#   bash scripts/install.sh            # CPU machine: torch 2.13.0 (CPU wheel) unless a torch is already importable
# colossalai 0.5.0 pins torch<=2.5.1 and transformers==4.51.3 and pulls ray/diffusers/...; its metadata must never be
# resolved by pip (it would replace torch with a 2.5.1 CUDA build). It is installed with --no-deps next to the
# dependencies it really imports (see requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-deps colossalai==0.5.0 contexttimer==0.3.3
"$PY" -m pip install -q --no-deps -e .   # the openmoe package itself (pyproject.toml); its dependencies are above
# The multi-node test (tests/parallel/test_multinode.py) runs sshd inside network namespaces: needs openssh-server.
if [ ! -x /usr/sbin/sshd ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server) >/dev/null
fi
"$PY" -c "import colossalai, transformers, torch; print('torch', torch.__version__, 'transformers', transformers.__version__, 'colossalai', colossalai.__version__)"
