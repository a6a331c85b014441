#!/usr/bin/env bash
# The linter and the whole test suite on a fresh machine (installs first):  bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m ruff check .     # lint first (pyproject.toml [tool.ruff]): a lint error fails CI like a test
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
