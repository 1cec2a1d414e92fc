# Sourced by scripts/test-torch-feature and scripts/setup-encoder-peer: the pinned PyTorch wheel
# (the libtorch tch 0.26.0 is built for) and the venv it is installed in, shared by both.
#
# Needs CACHE (where the wheel and the venv go) and PYTHON (a CPython 3.11) set; defines
# TORCH_VERSION, WHEEL, WHEEL_SHA256 and VENV, and `ensure_torch_venv`, which downloads the wheel
# (checked against its sha256) and installs it into $VENV unless that venv already has it.
TORCH_VERSION=2.13.0
WHEEL=torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA256=60fcdcb2f3876e21146cb4524ef06397d727ca9ad5f020818547e25075fe3cb7
VENV=$CACHE/venv

ensure_torch_venv() {
    mkdir -p "$CACHE"
    local pyver
    pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
    if [ "$pyver" != 311 ] || [ "$(uname -m)" != x86_64 ]; then
        echo "the pinned torch wheel is for CPython 3.11 on x86_64 Linux" >&2
        echo "(got python $pyver on $(uname -m)); set PYTHON to a python3.11" >&2
        return 2
    fi
    if [ ! -f "$CACHE/$WHEEL" ]; then
        echo "== downloading $WHEEL"
        "$PYTHON" -m pip download --no-deps --only-binary=:all: "torch==$TORCH_VERSION" -d "$CACHE"
    fi
    echo "$WHEEL_SHA256  $CACHE/$WHEEL" | sha256sum -c --quiet
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
        echo "== installing $WHEEL into $VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install --progress-bar off "$CACHE/$WHEEL"
    fi
}
