#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's chromium and chromium-driver, which
# the web demo's browser test drives headless. Installs them with apt-get when they are missing
# (as root, or through passwordless sudo); otherwise says what to install and fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "streammem tests: install chromium and chromedriver (the browser test of the web demo needs them)" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "streammem tests: run 'sudo apt-get install chromium chromium-driver' (the web demo's browser test needs them)" >&2
    exit 1
  fi
fi
echo "installing chromium and chromium-driver (apt-get) for the web demo's browser test"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
