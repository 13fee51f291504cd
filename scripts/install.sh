#!/usr/bin/env bash
# Install medsam3 into .venv: the pinned CPU-runnable torch pair, the package, and (as root, when
# missing) the Debian bits it uses. `bash scripts/install.sh` for use, `bash scripts/install.sh test`
# for the test extras plus headless Chromium for the viewer's browser test.
#
# apt: `medsam3 data fetch-real` (and the demo) fetch Debian's mricron-data with `apt-get download`,
# which needs the package lists; a fresh machine may have none, so they are updated once here.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/pip install -q -r requirements/cpu.txt -e ".${extras:+[$extras]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    lists_empty=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n 1)
    need_browser=""
    if [ "$extras" = test ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
        need_browser=1
    fi
    if [ -z "$lists_empty" ] || [ -n "$need_browser" ]; then
        apt-get update -qq
    fi
    if [ -n "$need_browser" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
fi
