#!/usr/bin/env bash
# Stand-in for actions-runner's run.sh: heartbeats to the local GitHub stand-in until stopped.
# -S: the stand-in needs only the standard library, so skip site-packages (a venv's .pth hooks cost
# more than the stand-in itself, and 50 simulated instances start it twice each per registration).
exec "${RUNNER_POOL_PYTHON:-python3}" -S "$(dirname "$0")/standin_runner.py" run "$@"
