#!/usr/bin/env bash
# One-command GPU acceptance (README, "GPU acceptance run"); all the work is in gpu_acceptance.py.
# PYTHON: the interpreter that holds the GPU build of torch (default python3).
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_acceptance.py" "$@"
