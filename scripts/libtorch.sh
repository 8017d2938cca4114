#!/usr/bin/env bash
# Makes libtorch available to the build: a venv under ~/.cache/vtp/venv with
# the `torch` wheel from PyPI (tch 0.26 needs torch 2.13.0), then prints the
# `export` lines that point torch-sys at it:
#
#   eval "$(scripts/libtorch.sh)"
set -euo pipefail
VTP_CACHE="${VTP_CACHE:-$HOME/.cache/vtp}"
VENV="${VTP_VENV:-$VTP_CACHE/venv}"
TORCH_VERSION="2.13.0"
log() { echo "libtorch: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV" >&2 || {
        log "python3 -m venv failed; installing python3-venv"
        if [ "$(id -u)" = 0 ]; then apt-get install -y -qq python3-venv >&2; else sudo apt-get install -y -qq python3-venv >&2; fi
        python3 -m venv "$VENV" >&2
    }
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "installing torch==$TORCH_VERSION into $VENV (a large download, once)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy safetensors >&2
fi
# torch-sys asks the Python on PATH where torch is, and reruns its build
# script only when a variable it watches changes; LIBTORCH_USE_PYTORCH is one
# and needs only to be set. Its value is therefore the torch directory the
# build links: a different torch (another venv, a recreated cache, or pip's
# temporary build environment of an earlier `pip install`) is a rebuild,
# never a link against a torch that has vanished.
TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
cat <<ENV
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export LIBTORCH_USE_PYTORCH="$TORCH_DIR"
ENV
