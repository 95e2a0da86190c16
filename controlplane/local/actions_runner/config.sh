#!/usr/bin/env bash
# Stand-in for actions-runner's config.sh: registers with the local GitHub stand-in.
# -S: the stand-in needs only the standard library, so skip site-packages (a venv's .pth hooks cost
# more than the stand-in itself, and 50 simulated instances start it twice each per registration).
exec "${RUNNER_POOL_PYTHON:-python3}" -S "$(dirname "$0")/standin_runner.py" config "$@"
