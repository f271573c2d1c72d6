#!/usr/bin/env bash
# The kill-restart run: blkback SIGKILLed at N seeded random points (default 50) while a guest streams
# tagged writes to a raw and a qcow2 PV disk; every acknowledged (for qcow2: flushed) write must be on the
# images, the guest must leak no page or grant, and the frontend must come back every time. Prints the
# figures (kill points, writes acknowledged, pages and grants before/after, time).
#   ci/kill_restart.sh [POINTS [SEED]]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
export XENPV_KILL_POINTS=${1:-50}
export XENPV_KILL_SEED=${2:-20240611}
exec "$top/.venv/bin/python" -m pytest -p no:cacheprovider -s -o log_cli=false \
    "$top/tests/integration/test_blkback_kill_restart.py"
