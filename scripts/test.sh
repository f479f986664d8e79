#!/usr/bin/env bash
# Installs what the tests need (first run only) and runs the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
"$root/scripts/setup-browser.sh"  # Chromium for the playground's browser test
cd "$root"
ruff check --quiet .  # the linter first: a lint error fails the run before the (long) tests
exec python -m pytest -q "$@"
