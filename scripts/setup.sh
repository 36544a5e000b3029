#!/usr/bin/env bash
# Create .venv (if missing) with PyTorch and ttlayers installed editable.
#   bash scripts/setup.sh                  # library + test/dev tools
#   bash scripts/setup.sh --fashion-mnist  # also Debian's Fashion-MNIST files, if absent
set -euo pipefail
cd "$(dirname "$0")/.."

fashion_mnist=0
for arg in "$@"; do
    case "$arg" in
        --fashion-mnist) fashion_mnist=1 ;;
        -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (the only option is --fashion-mnist)" >&2; exit 2 ;;
    esac
done

python=${PYTHON:-python3}
# A venv whose pip is missing is what a failed "python3 -m venv" leaves (Debian without
# python3-venv): rebuild it rather than fail on it at every later run.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    if ! "$python" -c "import ensurepip" 2>/dev/null; then
        echo "setup.sh: $python cannot create virtual environments (no ensurepip)." >&2
        echo "On Debian or Ubuntu: sudo apt-get install python3-venv; then run this again." >&2
        exit 1
    fi
    rm -rf .venv
    "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first, pinned: this release's CPU wheel lies on our machines' disk (pip is configured
# to find it there), while an unpinned torch (or the project's own "torch>=2.5") would pull a
# multi-GB CUDA build from PyPI. Elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# takes the CPU build from PyTorch's own index.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    pip install "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
pip install -e ".[dev]"

if [ "$fashion_mnist" = 1 ]; then
    data=/usr/share/datasets/fashion-mnist
    if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
        if ! command -v apt-get >/dev/null; then
            echo "setup.sh: no apt-get here to install Fashion-MNIST; put its four IDX .gz" \
                "files in $data (or pass examples/mnist.py --data-dir)." >&2
            exit 1
        fi
        sudo_cmd=""
        [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
    fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, ttlayers; print("ttlayers", ttlayers.__version__, "torch", torch.__version__)')"
