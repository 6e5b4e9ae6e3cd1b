#!/bin/bash
# benchmarks/suite.sh - all benchmark rows (issue 4) in one command; see suite.py and README.md.
#   sudo benchmarks/suite.sh [--quick] [--no-record] [--phases rates,spool,restart,fault] [...]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$REPO/.venv/bin/relayd" ] \
   || ! "$REPO/.venv/bin/python" -c "import standardwebhooks" 2>/dev/null; then
  PY=$(command -v python3.11 || command -v python3) || { echo "no python3.11/python3" >&2; exit 2; }
  echo "[suite] creating $REPO/.venv and installing relayd (pip install -e .[bench])" >&2
  [ -x "$REPO/.venv/bin/python" ] || "$PY" -m venv "$REPO/.venv"
  "$REPO/.venv/bin/pip" install -q -e "$REPO[bench]"
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null \
   || ! command -v postfix >/dev/null || ! command -v bc >/dev/null; then
  echo "[suite] installing postfix / smtp-source / smtp-sink / bc" >&2
  "$REPO/../shared/bench/postfix_peer.sh" install
fi
exec "$REPO/.venv/bin/python" "$REPO/benchmarks/suite.py" "$@"
