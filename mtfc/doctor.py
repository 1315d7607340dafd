"""``mtfc doctor``: what of the dependency stack is installed, and how to fix what is not."""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from typing import Callable

FIX = "bash tools/setup.sh"


def _version(module: str) -> str:
    return getattr(importlib.import_module(module), "__version__", "installed")


def _mmcv() -> str:
    version = _version("mmcv")
    try:
        importlib.import_module("mmcv._ext")
    except ImportError:
        raise ImportError(f"mmcv {version} has no compiled ops (mmcv-lite?); mmseg needs them")
    return f"{version} (ops compiled)"


def _detectron2() -> str:
    version = _version("detectron2")
    importlib.import_module("detectron2.modeling")
    try:
        importlib.import_module("detectron2._C")
        ext = "compiled extension present"
    except ImportError:
        ext = "Python only (no _C: pure pycocotools evaluation, no rotated boxes / deformable convs)"
    return f"{version}, {ext}"


def _mmseg() -> str:
    version = _version("mmseg")
    importlib.import_module("mmseg.models")
    return version


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        return "not available (CPU only)"
    return f"{torch.version.cuda}, {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"


CHECKS: dict[str, tuple[Callable[[], str], str]] = {
    "torch": (lambda: _version("torch"), FIX),
    "torchvision": (lambda: _version("torchvision"), FIX),
    "numpy": (lambda: _version("numpy"), FIX + "  (mtfc's stack needs numpy<2)"),
    "compressai": (lambda: _version("compressai"), "pip install compressai==1.2.8"),
    "constriction": (lambda: importlib.metadata.version("constriction"), "pip install constriction==0.5.0"),
    "albumentations": (lambda: _version("albumentations"), "pip install albumentations==2.0.8"),
    "pycocotools": (lambda: _version("pycocotools.coco"), "pip install pycocotools"),
    "detectron2": (_detectron2, FIX + "  (installs detectron2's Python package from the sal-detectron2 wheel)"),
    "mmcv": (_mmcv, "MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0  (or: " + FIX + ")"),
    "mmseg": (_mmseg, "pip install mmsegmentation==1.2.2 ftfy regex"),
    "cuda": (_cuda, ""),
}


def report() -> tuple[list[tuple[str, bool, str]], bool]:
    """Rows of (name, ok, version or 'missing: error → fix') and whether everything is there."""
    rows = []
    for name, (probe, fix) in CHECKS.items():
        try:
            rows.append((name, True, probe()))
        except Exception as e:  # any import failure is a finding, not a crash
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            rows.append((name, False, f"MISSING ({first}) → fix: {fix}"))
    return rows, all(ok for _, ok, _ in rows)


def main() -> int:
    rows, ok = report()
    print(f"mtfc doctor — Python {sys.version.split()[0]} on {platform.platform()}")
    for name, good, text in rows:
        print(f"  {'ok ' if good else 'ERR'} {name:<15} {text}")
    print("all good" if ok else "some components are missing: run the fix shown on each ERR line")
    return 0 if ok else 1
