#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the DSM demo on the built-in phantom.
# Extra arguments go to nnUNetv2_dsm_demo, e.g.  scripts/run_demo.sh --quick --output /tmp/dsm_demo
# Writes ./dsm_demo_output/report.md by default (see docs/demo.md).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/setup_env.sh")"
exec "$venv/bin/nnUNetv2_dsm_demo" "$@"
