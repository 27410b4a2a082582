#!/usr/bin/env bash
# Quick start, command 2: set up what is missing, then lint, type-check and
# run the whole test suite (unit and integration, with real Exim, clamd,
# Postfix, Redis started on loopback by the tests).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --no-run
echo "== ruff"; .venv/bin/ruff check queueguard tests bench
echo "== mypy --strict"; .venv/bin/mypy
echo "== lint-imports (the layers, docs/architecture.md)"; .venv/bin/lint-imports --no-cache
echo "== pytest"; exec .venv/bin/pytest -q -p no:cacheprovider "$@"
