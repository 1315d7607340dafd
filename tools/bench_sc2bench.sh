#!/usr/bin/env bash
# Side by side, in one process: sc2bench's Entropic Student encoder + entropy coding vs mtfc's
# Codec.encode for each encoder variant (1 thread, batch 1, interleaved repeats; tools/bench_sc2bench.py).
#   bash tools/bench_sc2bench.sh [--sizes 224 64] [--repeats 30] [--json OUT]
# sc2bench is installed only into a throw-away environment (MTFC_SC2BENCH_VENV, default
# ~/.cache/mtfc/sc2bench-venv) that sees mtfc's environment (MTFC_PYTHON, default tools/setup.sh's
# ~/.cache/mtfc/venv/bin/python, else the `python` on PATH) through a .pth file: sc2bench and
# torchdistill without their dependencies, plus timm (what `import sc2bench.models` needs that mtfc's
# stack lacks). mtfc itself never imports sc2bench.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_base=$HOME/.cache/mtfc/venv/bin/python; [ -x "$default_base" ] || default_base=python
base=${MTFC_PYTHON:-$default_base}
venv=${MTFC_SC2BENCH_VENV:-$HOME/.cache/mtfc/sc2bench-venv}
log() { printf '[bench_sc2bench %s] %s\n' "$(date +%T)" "$*" >&2; }

"$base" -c "import torch, compressai" || { log "MTFC_PYTHON=$base cannot import torch and compressai (mtfc's environment)"; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv (on top of $("$base" -c 'import sys; print(sys.prefix)'))"
  "$("$base" -c 'import sys; print(sys._base_executable)')" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
parent=$("$base" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$parent')" > "$site/mtfc-parent-env.pth"
if ! "$venv/bin/python" -c "import sc2bench.models.layer" >/dev/null 2>&1; then
  log "installing sc2bench, torchdistill, timm (no dependencies) into $venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps sc2bench torchdistill timm
fi
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  exec "$venv/bin/python" "$root/tools/bench_sc2bench.py" "$@"
