"""MLflow tracking: one parent run per pipeline invocation, one nested run per stage.

Snakemake's ``onstart`` (or ``tvt pipeline``) opens the parent run and exports its id in
``TVT_PIPELINE_RUN_ID``; every stage process, local or on a SLURM node, inherits it and
nests its own run under it. A stage run without a parent (e.g. ``dvc repro`` called
directly) is logged as a standalone run, so nothing is ever lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tvt.config import REPO_ROOT, params_hash, stage_params

PIPELINE_ENV = "TVT_PIPELINE_RUN_ID"
log = logging.getLogger(__name__)


def tracking_uri(cfg: Mapping) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` wins over the config's ``tracking.uri``.

    A relative sqlite path is resolved against the current directory (the project root
    when run from Snakemake/DVC) and its folder is created.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg["tracking"]["uri"]
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        if os.environ.get("SLURM_JOB_ID"):
            warnings.warn(
                f"MLflow store {uri} is a sqlite file used from a SLURM job: concurrent jobs on a "
                "shared filesystem can lock or corrupt it. Point tracking.uri (or "
                "MLFLOW_TRACKING_URI) at an `mlflow server` instead (scripts/start-mlflow-server.sh, "
                "docs/cluster.md).",
                stacklevel=2,
            )
    return uri


def git_commit() -> str:
    """HEAD commit of the project checkout, suffixed with '-dirty' when files changed."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} (lists kept as their string form)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _mlflow(cfg: Mapping):
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg["tracking"]["experiment"])
    return mlflow


def start_pipeline_run(cfg: Mapping, config_path: str | Path, engine: str) -> str:
    """Open the parent run of one pipeline invocation; export and return its id.

    Created through the client API so that it stays RUNNING after this process returns:
    the stage processes nest under it and :func:`end_pipeline_run` closes it.
    """
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    commit = git_commit()
    run = client.create_run(
        mlflow.get_experiment_by_name(cfg["tracking"]["experiment"]).experiment_id,
        run_name=f"pipeline ({cfg['mode']}, {engine})",
        tags={"tvt.kind": "pipeline", "tvt.mode": cfg["mode"], "tvt.engine": engine,
              "tvt.config_path": str(config_path), "tvt.git_commit": commit,
              "mlflow.source.git.commit": commit.removesuffix("-dirty")},
    )
    for key, value in {"mode": cfg["mode"], "seed": cfg["seed"], "config": str(config_path)}.items():
        client.log_param(run.info.run_id, key, value)
    os.environ[PIPELINE_ENV] = run.info.run_id
    return run.info.run_id


def end_pipeline_run(cfg: Mapping, run_id: str, ok: bool) -> None:
    _mlflow(cfg).MlflowClient().set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def end_current_pipeline_run(cfg: Mapping, ok: bool) -> None:
    """Close the pipeline run this process opened (:func:`start_pipeline_run`), if it opened one."""
    run_id = os.environ.get(PIPELINE_ENV)
    if run_id:
        end_pipeline_run(cfg, run_id, ok)


class StageRun:
    """Thin handle on the active stage run (keeps mlflow out of stage code)."""

    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run = run
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path)

    def log_figure(self, figure, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    def log_text(self, text: str, name: str) -> None:
        self._mlflow.log_text(text, name)


class NullRun:
    """What non-main processes of a multi-process stage log to: nothing. Only rank 0 of
    an ``accelerate launch`` / torchrun job owns the stage's MLflow run."""

    run_id = None

    def __getattr__(self, name):
        if name.startswith("log_") or name == "set_tags":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def is_main_process() -> bool:
    """Rank 0 (or a single process): the launcher variables of torchrun/accelerate."""
    return int(os.environ.get("RANK", "0")) == 0


class Terminated(SystemExit):
    """SIGTERM (SLURM's time limit or ``scancel``, a preempted job) arrived during a stage."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated`, so ``finally`` blocks and the MLflow run's status
    see it; Python's default would end the process without unwinding. Exit status stays 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, _frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(stage: str, cfg: Mapping, section: str | None, config_path: str | Path | None = None,
              tags: Mapping[str, Any] | None = None, params: Mapping | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, nested under the pipeline run when there is one.

    Logs the stage's own parameters (never other sections), their hash, the git commit
    and the config path; marks the run FAILED if the stage raises, KILLED on SIGTERM or Ctrl-C. Under a multi-process
    launcher only rank 0 logs, so one stage is one run however many GPUs train it.
    """
    if not is_main_process():
        yield NullRun()
        return
    mlflow = _mlflow(cfg)
    params = stage_params(cfg, section) if params is None else params  # a variant's: its merged section
    parent = os.environ.get(PIPELINE_ENV) or None
    commit = git_commit()
    all_tags = {
        "tvt.kind": "stage", "tvt.stage": stage, "tvt.mode": cfg["mode"],
        "tvt.config_hash": params_hash(params), "tvt.git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "tvt.pipeline": parent or "standalone",
    }
    if config_path is not None:
        all_tags["tvt.config_path"] = str(config_path)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if parent is not None:
        # the parent may be a stale id (e.g. a killed pipeline): nest only if it exists
        try:
            mlflow.MlflowClient().get_run(parent)
        except Exception:  # noqa: BLE001 - mlflow raises several types for unknown runs
            log.warning("pipeline run %s not found in %s; logging %s standalone", parent,
                        tracking_uri(cfg), stage)
            parent = None
            all_tags["tvt.pipeline"] = "standalone"
    run = mlflow.start_run(run_name=stage, tags={**all_tags, **({"mlflow.parentRunId": parent} if parent else {})})
    handle = StageRun(mlflow, run)
    try:
        with _terminate_as_exception():
            handle.log_params(params)
            yield handle
    except (Terminated, KeyboardInterrupt):
        mlflow.end_run(status="KILLED")  # the MLflow UI then shows a killed job, not one still running
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def describe_latest_pipeline(cfg: Mapping) -> str:
    """A short text view of the newest pipeline run and its stage runs (for the console)."""
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(cfg["tracking"]["experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.`tvt.kind` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return f"no pipeline run yet in {tracking_uri(cfg)} (experiment {exp.name})"
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    lines = [(f"MLflow {tracking_uri(cfg)} · experiment '{exp.name}' · pipeline run {parent.info.run_id} "
              f"({parent.info.status})")]
    for child in children:
        seconds = ((child.info.end_time or child.info.start_time) - child.info.start_time) / 1000
        lines.append(f"  └─ {child.data.tags.get('tvt.stage', child.info.run_name):18s} {child.info.status:9s} "
                     f"{seconds:7.1f} s  {len(child.data.metrics)} metrics")
    if not children:
        lines.append("  (no stage ran in this invocation: everything was up to date)")
    return "\n".join(lines)
