#!/usr/bin/env bash
# Creates .venv with torch==2.11.0 (the libtorch tch 0.24 binds) and the Python packages the tests
# use, and links .venv/libtorch to the wheel's torch directory for torch-sys (.cargo/config.toml).
# Idempotent: re-running only installs what is missing.
#   setup-venv.sh system  only the Debian packages the build needs (a C++ compiler, protoc)
#   setup-venv.sh torch   only torch (what building and running the binaries need: make demo)
#   setup-venv.sh [all]   torch and everything the tests compare against (make test)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
PYTHON=${PYTHON:-python3}

need_apt() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: $*" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: please install the Debian packages: $* (sudo apt-get install $*)" >&2
        exit 1
    fi
}

command -v "$PYTHON" >/dev/null || need_apt python3
command -v c++ >/dev/null || need_apt g++
# The TensorBoard event format's protos are compiled at build time.
command -v protoc >/dev/null || need_apt protobuf-compiler
WHAT=${1:-all}
[ "$WHAT" = system ] && exit 0

# torch with its CUDA libraries takes about 5.5 GB installed; pip fails late and obscurely
# ("No space left on device") when the disk is short, so say it first. No pip cache (--no-cache-dir
# below): it would keep a second, compressed copy of every wheel.
if [ ! -d .venv/lib ] || ! ls .venv/lib/python*/site-packages/torch >/dev/null 2>&1; then
    free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "${free_gb:-0}" -lt 8 ]; then
        echo "setup: warning: ${free_gb} GB free on $(df -P . | awk 'NR == 2 { print $6 }');" \
             "torch needs about 5.5 GB and the build about 6 GB more" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        need_apt python3-venv
        "$PYTHON" -m venv .venv
    fi
fi

case "$WHAT" in
    torch)
        echo "setup: installing torch $TORCH_VERSION into .venv (about 2.7 GB the first time; pip is quiet meanwhile)" >&2
        # Without bytecode: compiling torch's modules would take CPU the parallel build needs.
        .venv/bin/python -m pip install -q --no-compile --no-cache-dir --disable-pip-version-check "$(grep '^torch==' scripts/requirements.txt)"
        ;;
    all)
        echo "setup: installing the Python packages of the tests into .venv (torch is about 2.7 GB the first time)" >&2
        .venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check -r scripts/requirements.txt
        # torch may have come without bytecode (the demo's quicker install): the tests import it often.
        .venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))')" >/dev/null || true
        ;;
    *)
        echo "usage: setup-venv.sh [system|torch|all]" >&2
        exit 2
        ;;
esac

installed=$(.venv/bin/python -W ignore -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$installed" != "$TORCH_VERSION" ]; then
    echo "setup: .venv has torch $installed but tch 0.24 needs exactly torch $TORCH_VERSION;" \
         "remove .venv and run 'make setup' again" >&2
    exit 1
fi

torch_dir=$(.venv/bin/python -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch
# albef-dist's NCCL backend: cudarc loads "libnccl.so"; the wheel ships only libnccl.so.2 (the
# binaries' rpath includes torch's lib directory, so a link there is found).
if [ -e "$torch_dir/../nvidia/nccl/lib/libnccl.so.2" ]; then
    ln -sfn ../../nvidia/nccl/lib/libnccl.so.2 "$torch_dir/lib/libnccl.so"
fi
echo "setup: torch $installed at $torch_dir"
