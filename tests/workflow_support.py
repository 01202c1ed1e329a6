"""Running the project's engines in a scratch copy of it, the way the README runs them
(the end-to-end workflow, ablation, README, DVC-remote and SLURM tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tvt import config

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent
#: the engines as the README runs them after `source .venv/bin/activate`, but with nothing of the
#: environment on PATH: the rules must find the project's interpreter themselves
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TVT = [sys.executable, "-m", "tvt"]
DVC = str(BIN / "dvc")


def _env(**extra) -> dict:
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    env = {**os.environ, "PATH": path, **extra}
    for name in ("TVT_PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI", "TVT_WEIGHTS_DIR", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], cwd: Path, ok: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, check=False)
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _project_copy(dest: Path, cfg_name: str = "ci.yaml", weights: Path | None = None) -> Path:
    """A scratch clone of the project with ``config/<cfg_name>`` as its config.yaml and, like
    after `make`, the weight cache in ``.tvt-cache/weights``."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("Snakefile", "workflow", "config", "tvt", "profiles", "pyproject.toml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    shutil.copy2(ROOT / "config" / cfg_name, dest / "config" / "config.yaml")
    if weights is not None:
        (dest / ".tvt-cache").mkdir()
        (dest / ".tvt-cache" / "weights").symlink_to(weights)
    return dest


class TrainedPipeline:
    """One CI-config pipeline trained for the whole session, handed to each test as a fresh copy.

    The copy lives at the path where the pipeline ran (stage outputs, MLflow's artifact URIs and the
    evaluation's links hold absolute paths) and keeps every mtime (Snakemake's and the no-op tests'
    ground truth), so a test may mutate it freely: the next one gets the pristine state back.
    """

    def __init__(self, root: Path, weights: Path):
        self.project, self._snapshot = root / "project", root / "snapshot"
        _project_copy(self.project, weights=weights)
        _run([*SNAKEMAKE, "--cores", "2", "all"], self.project)  # README: no TVT_WEIGHTS_DIR, no venv on PATH
        shutil.copytree(self.project, self._snapshot, symlinks=True)

    def fresh(self) -> Path:
        forget_mlflow_databases(self.project)
        shutil.rmtree(self.project)
        shutil.copytree(self._snapshot, self.project, symlinks=True)
        return self.project


def forget_mlflow_databases(folder: Path) -> None:
    """Close this process's MLflow connections to the SQLite databases under ``folder``.

    MLflow keeps one SQLAlchemy engine per database URI for the life of the process
    (``SqlAlchemyStore._engine_map``, pooled connections) and one store per URI (an lru_cache): a
    pooled connection keeps reading a database *file that was replaced* under the same path (it
    holds the old inode), so a test reading a restored project would see the previous test's runs.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    for uri in [u for u in SqlAlchemyStore._engine_map if str(folder) in u]:
        SqlAlchemyStore._engine_map.pop(uri).dispose()
    type(_tracking_store_registry)._get_store_with_resolved_uri.cache_clear()
