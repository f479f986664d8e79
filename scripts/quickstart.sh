#!/usr/bin/env bash
# Installs everything (first run only), then runs the whole pipeline on the built-in tiny model: no download.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
exec ortlora quickstart "$@"
