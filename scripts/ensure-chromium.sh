#!/usr/bin/env bash
# The browser tests (tests/test_ui.py) drive Debian's chromium with Playwright for Python; Playwright's
# own browser download is not used. Installs the package when it is missing (root, apt); a no-op otherwise.
set -euo pipefail
CHROMIUM="${CBD_CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "ensure-chromium: $CHROMIUM is missing and apt-get cannot run here; install Debian's chromium" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
"$CHROMIUM" --version
