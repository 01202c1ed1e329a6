"""Compatibility shims for the CPU-only machines this project is tested on.

Two library problems (docs/method.md §2), isolated here so nothing else needs to know:

1. torchvision 0.28 ships only CUDA builds. On a CPU torch its C++ extension cannot
   load, and ``torchvision._meta_registrations`` then fails at import because it
   registers fake kernels for ``torchvision::nms`` / ``torchvision::qnms`` whose schemas
   were never defined. We define those two schemas ourselves, *only* when the extension
   really fails to load; where it loads (a normal CUDA install) nothing is changed.
2. basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, which was renamed
   to ``_functional_tensor`` in torchvision 0.17. We alias the old name when it is missing.

3. bitsandbytes (required by pyiqa's metadata, never used here: no quantised training; `make`
   leaves it out, see constraints.lock.txt, but a cluster's `pip install` brings it) logs a
   kernel warning at import on machines without its CUDA build ("no 4-bit kernels", "no
   prebuilt binary for CUDA x.y"). Its logger is set to errors only.

Call :func:`apply` before importing torchvision, lpips, pyiqa or basicsr. It is
idempotent and cheap after the first call.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path

_APPLIED: dict[str, bool] | None = None

# Schemas as declared by torchvision's own C++ registration (csrc/ops/nms.cpp, qnms).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY_HANDLE = None  # keep the torch.library.Library alive for the process


def _torchvision_extension_loads() -> bool | None:
    """True if torchvision's compiled ops load, False if not, None if torchvision is absent."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(pkg_dir.glob("_C*.so")) + sorted(pkg_dir.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _define_torchvision_op_schemas() -> None:
    global _LIBRARY_HANDLE
    import torch

    if _LIBRARY_HANDLE is not None:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        name = schema.split("(", 1)[0]
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _LIBRARY_HANDLE = lib


def _alias_functional_tensor() -> bool:
    """Make ``torchvision.transforms.functional_tensor`` importable (basicsr needs it)."""
    old = "torchvision.transforms.functional_tensor"
    if old in sys.modules:
        return False
    try:
        importlib.import_module(old)
        return False
    except ModuleNotFoundError:
        pass
    new = importlib.import_module("torchvision.transforms._functional_tensor")
    sys.modules[old] = new
    return True


def apply() -> dict[str, bool]:
    """Apply the shims that this installation needs; return which ones were applied."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    applied = {"torchvision_op_schemas": False, "functional_tensor_alias": False}
    if "torchvision" not in sys.modules:
        loads = _torchvision_extension_loads()
        if loads is False:
            _define_torchvision_op_schemas()
            applied["torchvision_op_schemas"] = True
    if importlib.util.find_spec("torchvision") is not None:
        applied["functional_tensor_alias"] = _alias_functional_tensor()
    _APPLIED = applied
    return applied
