#!/usr/bin/env bash
# Stand-in for actions-runner's config.sh: registers with the local GitHub stand-in.
exec "${RUNNER_POOL_PYTHON:-python3}" "$(dirname "$0")/standin_runner.py" config "$@"
