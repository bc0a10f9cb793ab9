#!/usr/bin/env bash
# Create the virtual environment and install the project, plus the default dataset where the system allows.
# Usage: scripts/setup.sh VENV "TORCH_SPEC"
set -euo pipefail
venv=${1:-.venv}
torch_spec=${2:-"torch==2.14.1 torchvision==0.29.1"}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# torch first and pinned as a pair: a torchvision built for another torch fails to import.
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet $torch_spec
"$venv/bin/python" -m pip install --quiet -e ".[test]"

# The default dataset ships as a Debian package; install it when we may (root, or passwordless sudo).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" != none ]; then
        echo "installing Debian's dataset-fashion-mnist (the default dataset)"
        $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
            || echo "note: could not install dataset-fashion-mnist; the loader will try torchvision's download instead"
    fi
fi
