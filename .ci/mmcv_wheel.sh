#!/usr/bin/env bash
# Build mmcv 2.1.0 (with its compiled CPU ops) from the sdist once and cache the wheel.
# mmdet 3.3 needs mmcv < 2.2 and no wheel of it exists for this torch; torch 2.14's headers
# need C++20. Usage: mmcv_wheel.sh PYTHON CACHE_DIR  -> prints the wheel path.
set -euo pipefail
py=$1
cache=$2
mkdir -p "$cache"
wheel=$(ls "$cache"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then echo "$wheel"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip install -q "setuptools==80.9.0" ninja wheel >&2
"$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$work" >&2
tar xzf "$work"/mmcv-2.1.0.tar.gz -C "$work"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$work"/mmcv-2.1.0/setup.py
echo "building mmcv 2.1.0 from source (~20 min on 2 cores, once)" >&2
(cd "$work"/mmcv-2.1.0 && MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel -q --no-build-isolation --no-deps . -w "$work"/dist >&2)
cp "$work"/dist/mmcv-2.1.0-*.whl "$cache"/
ls "$cache"/mmcv-2.1.0-*.whl | head -n 1
