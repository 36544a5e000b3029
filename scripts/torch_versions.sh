#!/usr/bin/env bash
# Run the test suite on other torch releases, each in a venv of its own, with src/ on
# PYTHONPATH (nothing is installed into .venv). Each venv is kept for later runs.
#   bash scripts/torch_versions.sh 2.5.1 2.9.1 2.12.1 2.14.1   # versions to test
#   VENVS=/tmp bash scripts/torch_versions.sh 2.5.1            # where the venvs go (default)
# Releases pip finds only on PyPI come as CUDA builds: about 3-5 GB and a few minutes each.
# The results are summed up at the end (exit 1 if any failed); each log is
# $VENVS/ttl-torch-<version>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,8s/^# \{0,1\}//p' "$0"
    [ $# -eq 0 ] && exit 2 || exit 0
fi
venvs=${VENVS:-/tmp}
root=$(pwd)
summary=()
failed=0
for version in "$@"; do
    venv="$venvs/ttl-torch-$version"
    log="$venvs/ttl-torch-$version.log"
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "=== torch $version: creating $venv"
        rm -rf "$venv" && python3 -m venv "$venv" || exit 1
        # torch before 2.3 was built against NumPy 1; the floor (2.5) takes NumPy 2.
        if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "torch==$version" numpy opt_einsum pytest hypothesis "safetensors>=0.4" \
            "onnx>=1.23" "onnxruntime>=1.32" "onnxscript>=0.7" >"$log" 2>&1; then
            summary+=("torch $version: install failed, see $log")
            failed=1
            continue
        fi
    fi
    echo "=== torch $version: tests (log: $log)"
    PYTHONPATH="$root/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rfE tests \
        >>"$log" 2>&1 || failed=1
    summary+=("torch $version: $(tail -n 1 "$log")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
