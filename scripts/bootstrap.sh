#!/usr/bin/env bash
# Create .venv (if needed) and install atc_patch with what a target needs. Idempotent: a stamp
# of the install inputs skips the work when nothing changed.
#   scripts/bootstrap.sh demo   -> torch, timm (the demo's needs)
#   scripts/bootstrap.sh test   -> everything, incl. mmcv built once from source (cached)
#   scripts/bootstrap.sh docs   -> the package with the docs extra (MkDocs, Material, mkdocstrings)
set -euo pipefail
target=${1:-test}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${ATC_VENV:-$root/.venv}
cache=${ATC_CACHE:-$HOME/.cache/atc_patch}
py=$venv/bin/python

stamp_src=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" "$root/.ci/mmcv_wheel.sh" | sha256sum | cut -c1-16)
stamp=$venv/.atc-$target-$stamp_src
if [ -f "$stamp" ]; then exit 0; fi

if [ ! -x "$py" ]; then
  echo "[bootstrap] creating $venv" >&2
  python3 -m venv "$venv"
fi
pip() {  # quiet pip that still fails the script when pip fails
  local log
  log=$(mktemp)
  if ! "$py" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
}
# torch first, pinned: these wheels lie on this machine's disk (README, "Set-up").
pip install "torch==2.14.1" "torchvision==0.29.1"
"$py" -c "import torch, torchvision" >/dev/null

if [ "$target" = "test" ]; then
  wheel=$(bash "$root/.ci/mmcv_wheel.sh" "$py" "$cache/wheels")
  pip install "$wheel"
  pip install -e "$root[all,test,docs]"
elif [ "$target" = "docs" ]; then
  pip install -e "$root[timm,vis,diffusers,docs]"
else
  pip install -e "$root[timm,vis]"
fi
"$py" -c "import atc_patch" >/dev/null
if [ "$target" = "test" ]; then
  "$py" -c "import timm, diffusers, tomesd, mmdet; from mmcv.ops import MultiScaleDeformableAttention"
fi
rm -f "$venv"/.atc-"$target"-*
touch "$stamp"
echo "[bootstrap] $target environment ready in $venv" >&2
