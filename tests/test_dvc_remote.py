"""DVC remote: pipeline outputs pushed to the remote come back bit-identical.

In a scratch git + DVC project that uses the repository's own ``.dvc/config`` (default remote
``storage``), the remote is redirected to a temporary directory the documented way
(``dvc remote modify --local``), the CI pipeline's first stage runs through ``dvc repro``,
``dvc push`` uploads, the cache and the outputs are deleted, and ``dvc pull``
must restore every file with the same sha256 -- and leave nothing for ``dvc repro`` to redo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from workflow_support import _project_copy, _run

from tvt import config, stages

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
TARGET = "data"  # the first stage: real outputs (photos, rendered text, manifest) in seconds


def _checksums(project: Path, outs: list[str]) -> dict[str, str]:
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in outs for p in sorted((project / out).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_default_remote_is_a_local_directory_in_the_checkout():
    assert (ROOT / ".dvc" / "config").is_file(), "no .dvc/config: the project has no default DVC remote"
    listed = _run([DVC, "remote", "list"], ROOT).stdout.split()
    assert listed[:2] == ["storage", str(ROOT / ".dvc" / "storage")] and "(default)" in listed
    assert "/storage" in (ROOT / ".dvc" / ".gitignore").read_text().split(), "the local remote must be git-ignored"


@pytest.mark.slow
def test_push_delete_pull_restores_identical_outputs(tmp_path):
    (tmp_path / "project").mkdir()
    project = _project_copy(tmp_path / "project")
    shutil.copytree(ROOT / ".dvc", project / ".dvc",
                    ignore=shutil.ignore_patterns("tmp", "cache", "storage", "config.local"))
    _run(["git", "init", "-q"], project)
    remote = tmp_path / "remote"
    _run([DVC, "remote", "modify", "--local", "storage", "url", str(remote)], project)

    # `dvc repro` runs `python -m tvt`: the environment's python, as after `source .venv/bin/activate`
    activated = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    _run([sys.executable, "-m", "tvt", "workflow", "dvc"], project)
    _run([DVC, "repro", TARGET], project, **activated)
    cfg = config.load(project / "config" / "config.yaml")
    stage = stages.stage_by_name(cfg, TARGET)
    outs = list(stage.view_paths(stage.outs))  # what DVC tracks: the view of the keyed folder
    before = _checksums(project, outs)
    assert len(before) > 10, f"too few outputs to be a meaningful check: {sorted(before)}"

    _run([DVC, "push"], project)
    # one object per distinct file content plus one directory listing per output
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == len(set(before.values())) + len(outs)
    assert not (project / ".dvc" / "storage").exists(), "--local override ignored: pushed to the default"
    assert json.loads(_run([DVC, "status", "--cloud", "--json"], project).stdout) == {}

    shutil.rmtree(project / ".dvc" / "cache")
    for out in outs:
        shutil.rmtree(project / out)
    _run([DVC, "pull", TARGET, "--with-deps"], project)

    assert _checksums(project, outs) == before
    assert json.loads(_run([DVC, "status", "--json", TARGET, "--with-deps"], project, **activated).stdout) == {}
