#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver from the distribution's packages, for the playground's browser
# test (tests/test_playground.py). Skips when both are already there; does nothing off Debian/Ubuntu, where the
# test then skips and says why.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if { have chromium || have chromium-browser; } && have chromedriver; then
  exit 0
fi
if ! have apt-get; then
  echo "setup-browser: no apt-get here; install chromium and its chromedriver to run the browser test" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if have sudo; then sudo="sudo"; else
    echo "setup-browser: not root and no sudo; install chromium and chromium-driver to run the browser test" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Debian names them chromium + chromium-driver; Ubuntu's chromium-browser is a snap wrapper, tried last.
$sudo apt-get update -qq || echo "setup-browser: apt-get update failed; trying the cached package lists" >&2
if ! $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver; then
  $sudo apt-get install -y -qq --no-install-recommends chromium-browser chromium-chromedriver ||
    echo "setup-browser: could not install Chromium; the browser test will skip" >&2
fi
