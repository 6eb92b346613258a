#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/setup_env.sh")"
cd "$repo"
exec "$venv/bin/pytest" -q "$@"
