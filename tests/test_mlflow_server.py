"""MLflow under concurrency: many stage processes, one tracking server, nothing lost.

On a cluster many SLURM jobs log at once. The supported set-up is ONE `mlflow server`
(scripts/start-mlflow-server.sh) owning the sqlite store, the jobs speaking HTTP. The test
starts that script on 127.0.0.1, opens one pipeline run, runs parallel processes that each
open a nested stage run through ``tvt.tracking.stage_run`` and log metric histories, and
then checks every run, every metric point and every parent link. The server is stopped
in the fixture's teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

from tvt import config, tracking

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "start-mlflow-server.sh"
N_PROCESSES = 8
N_STEPS = 10
START_TIMEOUT_S = 90

# One stage process: a nested run under $TVT_PIPELINE_RUN_ID, logging a history of two
# metrics (one request per point, as a training loop does) and a final summary metric.
WORKER = """
import sys
from tvt import config, tracking
cfg = config.load(sys.argv[1])
index, steps = int(sys.argv[2]), int(sys.argv[3])
with tracking.stage_run(f"worker{index}", cfg, "evaluate", tags={"worker": index}) as run:
    for step in range(steps):
        run.log_metrics({"loss": 1.0 / (step + 1) + index, "lr": 1e-4 * index}, step=step)
    run.log_metrics({"final": float(index)})
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``scripts/start-mlflow-server.sh`` on a free 127.0.0.1 port; its URL."""
    work = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work / "server.log").open("w")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TVT_MLFLOW_HOST", None)
    server = subprocess.Popen(
        ["bash", str(SCRIPT), str(port), f"sqlite:///{work / 'store' / 'mlflow.db'}", str(work / "artifacts")],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow server did not answer on {url}:\n"
                            + (work / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        # the script exec's `mlflow server`, which runs uvicorn as a child: stop the group
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_server_keeps_every_run_and_metric_of_parallel_stages(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv(tracking.PIPELINE_ENV, raising=False)  # restored after the test
    cfg_path = ROOT / "config" / "ci.yaml"
    cfg = config.load(cfg_path)
    parent = tracking.start_pipeline_run(cfg, cfg_path, "test")  # exports TVT_PIPELINE_RUN_ID

    t0 = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg_path), str(i), str(N_STEPS)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(N_PROCESSES)]
    for worker in workers:
        out, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, f"stage process failed:\n{out[-3000:]}"
    seconds = time.perf_counter() - t0
    tracking.end_pipeline_run(cfg, parent, ok=True)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("tvt.kind") == "stage"]
    assert len(runs) == N_PROCESSES + 1 and len(children) == N_PROCESSES
    assert client.get_run(parent).info.status == "FINISHED"
    assert sorted(int(r.data.tags["worker"]) for r in children) == list(range(N_PROCESSES))
    for run in children:
        index = int(run.data.tags["worker"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["tvt.pipeline"] == parent
        assert run.info.status == "FINISHED"
        assert "evaluate.crop_border" in run.data.params  # the stage's own section only
        assert run.data.metrics["final"] == index
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(N_STEPS)), f"worker{index} lost points"
        assert {m.step: m.value for m in history}[N_STEPS - 1] == pytest.approx(1.0 / N_STEPS + index)
        assert len(client.get_metric_history(run.info.run_id, "lr")) == N_STEPS
    print(f"\n{N_PROCESSES} processes x {2 * N_STEPS + 1} metric points through one server: {seconds:.1f} s")


@pytest.mark.parametrize(("uri", "in_slurm_job", "warns"), [
    ("sqlite:///{tmp}/mlflow.db", True, True),
    ("sqlite:///{tmp}/mlflow.db", False, False),
    ("http://127.0.0.1:5000", True, False),
])
def test_sqlite_store_from_a_slurm_job_warns(tmp_path, monkeypatch, uri, in_slurm_job, warns):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if in_slurm_job:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = {"tracking": {"uri": uri.format(tmp=tmp_path), "experiment": "x"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracking.tracking_uri(cfg) == cfg["tracking"]["uri"]
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        assert len(messages) == 1 and "SLURM job" in messages[0] and "mlflow server" in messages[0]
    else:
        assert messages == []


@pytest.mark.slow
def test_only_rank_zero_of_a_multi_process_stage_logs(tmp_path, monkeypatch):
    import mlflow

    from tvt import config, tracking

    cfg = {**config.load(config.REPO_ROOT / "config" / "ci.yaml"),
           "tracking": {"uri": f"sqlite:///{tmp_path / 'ranks.db'}", "experiment": "ranks"}}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PIPELINE_ENV, raising=False)
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with tracking.stage_run("degrade", cfg, "degrade") as run:
            run.log_metrics({"loss": float(rank)}, step=1)
            run.set_tags({"rank": rank})
    runs = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["uri"]).search_runs(
        [mlflow.MlflowClient(tracking_uri=cfg["tracking"]["uri"]).get_experiment_by_name("ranks").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["rank"] == "0" and runs[0].data.metrics["loss"] == 0.0
