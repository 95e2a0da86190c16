#!/usr/bin/env bash
# Stand-in for actions-runner's run.sh: heartbeats to the local GitHub stand-in until stopped.
exec "${RUNNER_POOL_PYTHON:-python3}" "$(dirname "$0")/standin_runner.py" run "$@"
