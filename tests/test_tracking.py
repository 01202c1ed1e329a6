"""A stage's MLflow run ends with the status of the stage: finished, failed, or killed by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

STAGE = textwrap.dedent("""
    import sys, time
    from tvt import tracking
    cfg = {"mode": "mini", "seed": 1, "tracking": {"uri": sys.argv[1], "experiment": "t"}}
    with tracking.stage_run("demo", cfg, None) as run:
        run.log_metrics({"started": 1.0})
        print("running", flush=True)
        if sys.argv[2] == "fail":
            raise RuntimeError("boom")
        if sys.argv[2] == "wait":
            time.sleep(60)
""")


def _env(uri: str) -> dict[str, str]:
    """The stage's store: $MLFLOW_TRACKING_URI wins over the config, and mlflow.set_tracking_uri
    in this process (earlier tests) exports it, so the child gets it explicitly."""
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


def _run_status(uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1
    return runs[0].info.status


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "status", "code"), [("ok", "FINISHED", 0), ("fail", "FAILED", 1)])
def test_run_status_follows_the_stage(tmp_path, mode, status, code):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run([sys.executable, "-c", STAGE, uri, mode], capture_output=True, text=True, timeout=120, check=False, env=_env(uri))
    assert done.returncode == code, done.stderr
    assert _run_status(uri) == status


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_exits_143(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", STAGE, uri, "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(uri))
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    assert _run_status(uri) == "KILLED"


@pytest.mark.slow
def test_a_restored_project_database_is_read_not_the_one_it_replaced(tmp_path):
    """The shared CI pipeline (tests/workflow_support.py) restores a project over the previous test's copy:
    MLflow's per-URI engine cache must not keep reading the replaced database file."""
    import shutil

    import mlflow
    from workflow_support import forget_mlflow_databases

    project = tmp_path / "project"
    (project / "results").mkdir(parents=True)
    uri = f"sqlite:///{project / 'results' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("restored")
    client.create_run(experiment)
    shutil.copytree(project, tmp_path / "snapshot")
    client.create_run(experiment)  # the previous test's run, absent from the snapshot

    def runs() -> int:
        reader = mlflow.MlflowClient(tracking_uri=uri)
        return len(reader.search_runs([reader.get_experiment_by_name("restored").experiment_id]))

    assert runs() == 2
    forget_mlflow_databases(project)
    shutil.rmtree(project)
    shutil.copytree(tmp_path / "snapshot", project)
    assert runs() == 1
