#!/usr/bin/env bash
# The one-call GPU suite (bench/gpu/suite.py says what it measures).
#   bash bench/gpu/run.sh OUT            on a bare H100/H200: installs the carried wheels (.whl/,
#                                        `make gpu-wheels`) into /tmp/site when its Python lacks them,
#                                        then runs every step within --budget-s (default 520 s)
#   bash bench/gpu/run.sh --smoke OUT    the same steps at toy sizes on a CPU (tests/bench/test_gpu_suite.py; 300 s budget)
# Extra arguments go to suite.py (--budget-s S, --steps a,b).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=python3                                       # a bare device: its image's Python
[ -x .venv/bin/python ] && PY=.venv/bin/python   # a machine where `make venv` ran
if ! "$PY" -c "import open_clip, webdataset, faiss, braceexpand" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "bench/gpu/run.sh: $PY lacks open_clip/webdataset/faiss and no .whl/ was carried: run make gpu-wheels and carry .whl" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" bench/gpu/suite.py "$@"
