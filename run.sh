#!/usr/bin/env bash
# One entry point that sets everything up itself, then runs the demo or the test suite.
#   bash run.sh demo [demo args]   # the main job: the exact-teacher benchmark of few-step students
#   bash run.sh test [pytest args] # ruff + the test suite
# Uses the current python3 (or $PYTHON). Installs torch only when it is missing, so an existing
# (e.g. CUDA) build is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
# installed (not just importable from this folder), with every import of the [test] extra in pyproject.toml;
# triton only where that extra installs it
TEST_EXTRA_PROBE='
import importlib.metadata, platform
importlib.metadata.distribution("piflow_kernels")
import datasets, diffusers, hypothesis, matplotlib, peft, pyarrow, pytest, pytest_benchmark, ruff, torchao, transformers
if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton
'

setup() {
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] torch missing: installing torch==2.13.0 (CPU wheel where available)"
        "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
    fi
    if ! "$PY" -c "$TEST_EXTRA_PROBE" >/dev/null 2>&1 || [ "${PIFLOW_REINSTALL:-0}" = "1" ]; then
        echo "[setup] installing piflow_kernels and its test extras"
        "$PY" -m pip install -q -e ".[test]"
    fi
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
    demo)
        setup
        exec "$PY" -m piflow_kernels demo "$@"
        ;;
    test)
        setup
        "$PY" -m ruff check .
        set +e
        "$PY" -m pytest -q "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "pytest collected no tests: failing" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash run.sh demo|test [args]" >&2
        exit 2
        ;;
esac
