#!/usr/bin/env bash
# Lint and run the tests; arguments go to pytest (e.g. scripts/test.sh -k pgserver -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
