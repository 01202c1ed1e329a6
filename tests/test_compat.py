"""The torchvision/basicsr shims: they make the libraries import here and are no-ops
where nothing is broken."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each test starts an interpreter that imports torch


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)


def test_libraries_import_after_apply():
    proc = _run("""
        import tvt.compat
        applied = tvt.compat.apply()
        import torchvision, lpips, basicsr.data.degradations
        from basicsr.utils.img_process_util import filter2D, USMSharp
        from basicsr.utils.diffjpeg import DiffJPEG
        import torch
        x = torch.rand(1, 3, 16, 16)
        k = torch.ones(1, 3, 3) / 9
        y = filter2D(x, k)
        assert y.shape == x.shape and not torch.equal(x, y)
        assert tvt.compat.apply() is applied  # idempotent
        print(applied)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "functional_tensor_alias" in proc.stdout


def test_schemas_defined_only_when_extension_cannot_load():
    proc = _run("""
        import tvt.compat as c
        loads = c._torchvision_extension_loads()
        applied = c.apply()
        assert applied["torchvision_op_schemas"] == (loads is False), (loads, applied)
        print(loads)
    """)
    assert proc.returncode == 0, proc.stderr


def test_noop_when_torchvision_already_imported_and_alias_present():
    # simulate a healthy (CUDA) install: the extension loads and the old module name
    # resolves -> neither shim is applied
    proc = _run("""
        import sys, types
        import tvt.compat as c
        c._torchvision_extension_loads = lambda: True
        sys.modules["torchvision.transforms.functional_tensor"] = types.ModuleType("stub")
        applied = c.apply()
        assert applied == {"torchvision_op_schemas": False, "functional_tensor_alias": False}, applied
    """)
    assert proc.returncode == 0, proc.stderr


def test_without_shim_torchvision_import_fails_here():
    # documents *why* the shim exists; skip on machines where torchvision is healthy
    proc = _run("import tvt.compat as c; print(c._torchvision_extension_loads())")
    if proc.stdout.strip() != "False":
        pytest.skip("torchvision's C++ extension loads on this machine: nothing to work around")
    proc = _run("import torchvision")
    assert proc.returncode != 0 and "nms" in proc.stderr
