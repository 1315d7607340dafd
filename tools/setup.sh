#!/usr/bin/env bash
# Sets up mtfc on a fresh machine: a virtual environment kept outside the clone (default
# ~/.cache/mtfc/venv), the pinned stack of tools/constraints.txt, detectron2's Python package and
# mtfc itself (editable). Idempotent: a stamp keyed on the constraints skips the heavy steps, and
# pip's wheel cache keeps mmcv's compiled wheel, so a second run takes seconds.
#   bash tools/setup.sh [--dev]        --dev adds the test tools
# MTFC_VENV=/path/to/env uses (or creates) that environment instead; an mmcv with compiled ops or a
# detectron2 already importable there is left alone.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MTFC_VENV:-$HOME/.cache/mtfc/venv}
dev=0; [ "${1:-}" = "--dev" ] && dev=1
cons="$root/tools/constraints.txt"
log() { printf '[mtfc setup %s] %s\n' "$(date +%T)" "$*" >&2; }

[ -x "$venv/bin/python" ] || { log "creating $venv"; "${PYTHON:-python3}" -m venv "$venv"; }
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
has() { "$py" -c "$1" >/dev/null 2>&1; }

stamp="$venv/.mtfc-stack-$(cat "$cons" "$0" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  t0=$SECONDS
  log "1/4 torch, torchvision, numpy, build tools (torch is a large download the first time)"
  pip install -c "$cons" --upgrade pip wheel ninja setuptools
  pip install -c "$cons" torch torchvision numpy opencv-python-headless opencv-python
  if has "from mmcv.ops import roi_align"; then
    log "2/4 mmcv with compiled ops already present: left alone"
  else
    log "2/4 mmcv 2.1.0 with ops (compiles ~9 min on 2 cores the first time; cached by pip afterwards)"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip install -c "$cons" --no-build-isolation mmcv
  fi
  log "3/4 compressai, albumentations, mmengine, mmsegmentation, detectron2's runtime deps, the deploy stack"
  pip install -c "$cons" compressai albumentations mmengine mmsegmentation ftfy regex \
    fvcore iopath pycocotools yacs termcolor tabulate cloudpickle omegaconf hydra-core matplotlib \
    tqdm tensorboard pyyaml pillow onnx onnxruntime ml_dtypes fastapi uvicorn httpx prometheus_client constriction
  if has "import detectron2.modeling"; then
    log "4/4 detectron2 already present: left alone"
  else
    # detectron2 is not on PyPI; sal-detectron2 ships its Python package in a cp310 wheel. The compiled
    # _C extension cannot load on other Pythons and is removed; mtfc needs only the Python code.
    log "4/4 detectron2 (Python package from the sal-detectron2 wheel)"
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    pip install --no-deps --only-binary=:all: --python-version 3.10 --target "$site" --upgrade sal-detectron2==0.7.2
    rm -f "$site"/detectron2/_C*.so
  fi
  rm -f "$venv"/.mtfc-stack-*
  touch "$stamp"
  log "stack installed in $((SECONDS - t0)) s"
else
  log "stack already installed in $venv (stamp ${stamp##*/})"
fi
# The real-photograph benchmark (configs/fashion.yaml) reads Fashion-MNIST from Debian's package, offline.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  log "Fashion-MNIST from Debian (dataset-fashion-mnist, 31 MB) for configs/fashion.yaml"
  { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } >/dev/null 2>&1 \
    || log "could not install dataset-fashion-mnist: configs/fashion.yaml needs it (everything else works without)"
fi
[ "$dev" = 1 ] && ! has "import pytest, xdist" && pip install pytest pytest-xdist
out=$(pip install --no-deps --no-build-isolation -e "$root" 2>&1) || { echo "$out" >&2; exit 1; }
ln -sfn "$venv" "$root/.venv"
log "ready: $root/.venv -> $venv"
