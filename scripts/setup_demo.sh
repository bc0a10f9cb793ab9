#!/usr/bin/env bash
# The demo extra (Gradio) into the project's venv, or Debian's Chromium for the browser test where apt-get may run.
# Usage: scripts/setup_demo.sh VENV          the demo extra
#        scripts/setup_demo.sh VENV --browser  Chromium only (make test)
set -euo pipefail
venv=${1:-.venv}
if [ "${2:-}" != "--browser" ]; then
    "$venv/bin/python" -m pip install --quiet -e ".[test,demo]"
elif ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" != none ]; then
        echo "installing Debian's chromium (the demo page's browser test)"
        $sudo apt-get install -y -qq chromium >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq chromium >/dev/null 2>&1; } \
            || echo "note: could not install chromium; the browser test will be skipped with that reason"
    fi
fi
