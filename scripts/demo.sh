#!/usr/bin/env bash
# Run the self-contained demo; arguments go to `sendd demo` (e.g. --messages 100000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/sendd demo "$@"
