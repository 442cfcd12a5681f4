#!/usr/bin/env bash
# Thin wrapper: poc/poc.sh [--root DIR] prepare|start|status|submit|stop|clean|env ...   (see poc/poc.py --help)
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/poc.py" "$@"
