#!/usr/bin/env bash
# Creates the Python venv that baseline.py runs in: Ray and Dask at the versions the
# published baseline figures were taken with.
#
#   worker/benches/data_path/setup.sh [VENV]    # default: target/data-path-venv
#
# Set PYTHON to use another interpreter than python3 (3.10 to 3.13: Ray ships wheels for those).
set -euo pipefail

RAY_VERSION=2.60.0
DASK_VERSION=2026.8.0

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
venv=${1:-$root/target/data-path-venv}
python=${PYTHON:-python3}

installed() {
    [[ -x $venv/bin/python ]] &&
        "$venv/bin/python" - "$RAY_VERSION" "$DASK_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
ray, dask = sys.argv[1:]
sys.exit(not (version("ray") == ray and version("dask") == dask and version("distributed") == dask))
EOF
}

if installed; then
    echo "ray==$RAY_VERSION and dask[distributed]==$DASK_VERSION already in $venv"
    exit 0
fi

# Debian splits ensurepip out of python3 into python3-venv; without it `-m venv` fails half-way.
if ! "$python" -c 'import ensurepip' 2>/dev/null; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get install -y python3-venv
    else
        echo "error: $python has no ensurepip: as root, apt-get install -y python3-venv" >&2
        exit 1
    fi
fi

if [[ ! -x $venv/bin/python ]]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "ray==$RAY_VERSION" "dask[distributed]==$DASK_VERSION"

installed || { echo "error: install into $venv did not give the pinned versions" >&2; exit 1; }
echo "ray==$RAY_VERSION and dask[distributed]==$DASK_VERSION installed in $venv"
