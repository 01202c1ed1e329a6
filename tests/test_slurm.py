"""SLURM: the pipeline on a real one-node cluster, and the paper-mode DAG's requests.

``test_ci_pipeline_runs_job_by_job_through_sbatch`` starts the cluster of tests/slurm/
(munge, slurmctld, slurmd; skipped only where it cannot start, never in CI), runs the head
of the CI pipeline with ``snakemake --profile profiles/slurm`` in a scratch copy of the
project, and then asks SLURM itself (``scontrol show job``) what ran: one COMPLETED job per
stage, named after Snakemake's run, in the partition the environment chose, with exactly
the registry's memory, CPUs and time limit, and no GPU. ``test_paper_dry_run_*`` needs no
cluster: the paper DAG is planned with the SLURM profile and every job's request must equal
the registry's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workflow_support import _project_copy, _run

from tvt import config, stages

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")
START = ROOT / "tests" / "slurm" / "start.sh"
PARTITION = "second"  # the test cluster's non-default partition (tests/slurm/slurm.conf.in)
# poll SLURM every few seconds instead of the profile's cluster-friendly 20 s and more
FAST_POLLING = ["--seconds-between-status-checks", "2", "--slurm-init-seconds-before-status-checks", "2"]
# Every job costs a few SLURM polls (~30 s on 2 busy cores), so the test runs the head of
# the CI pipeline: two dependent jobs, the second a multi-CPU one. The requests of all
# stages are checked by the paper dry run below.
TARGET = "degrade"
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.fixture(scope="module")
def slurm_cluster():
    proc = subprocess.run(["bash", str(START)], check=False, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"{START} exited {proc.returncode}"])[-1]
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM test, but {reason}")
        pytest.skip(reason)


def _upstream(cfg, name: str) -> set[str]:
    """The stage and every stage it needs (from the registry)."""
    all_stages = {st.name: st for st in stages.build_stages(cfg)}
    needed, todo = set(), [name]
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += list(all_stages[stage].needs)
    return needed


def _scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(token.split("=", 1) for token in out.split() if "=" in token)


def _slurm_minutes(minutes: int) -> str:
    """A time limit as scontrol prints it: [D-]HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def _tres(record: dict[str, str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in record["TRES"].split(","))


@pytest.mark.slow
def test_ci_pipeline_runs_job_by_job_through_sbatch(slurm_cluster, tmp_path):
    project = _project_copy(tmp_path)
    cfg = config.load(project / "config" / "config.yaml")
    assert not any(st.resources.gpus for st in stages.build_stages(cfg)), "a CI stage asks for a GPU; the node has none"
    registry = {name: stages.stage_by_name(cfg, name).resources for name in _upstream(cfg, TARGET)}

    t0 = time.perf_counter()
    proc = _run([SNAKEMAKE, "--profile", "profiles/slurm", TARGET, *FAST_POLLING, "--slurm-keep-successful-logs"],
                project, TVT_SLURM_PARTITION=PARTITION)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr

    run_uuid = re.search(r"SLURM run ID: (\S+)", log).group(1)
    jobs = {Path(path).parent.name.removeprefix("rule_"): (job_id, project / path)
            for job_id, path in SUBMITTED.findall(log)}
    assert len(SUBMITTED.findall(log)) == len(jobs) == len(registry), f"one sbatch per stage expected:\n{log[-3000:]}"
    assert set(jobs) == set(registry)

    table = []
    for stage, (job_id, slurm_log) in jobs.items():
        record = _scontrol_job(job_id)
        tres = _tres(record)
        res = registry[stage]
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
        assert record["JobName"] == run_uuid and record["Comment"] == f"rule_{stage}"
        assert record["Partition"] == PARTITION, "TVT_SLURM_PARTITION did not reach sbatch"
        assert Path(record["WorkDir"]) == project
        assert tres["mem"] == f"{res.mem_mb}M" and int(tres["cpu"]) == res.cpus
        assert record["TimeLimit"] == _slurm_minutes(res.runtime)
        assert not any("gpu" in key for key in tres), f"{stage} got a GPU: {record['TRES']}"
        assert f"tvt stage {stage} " in slurm_log.read_text()
        table.append(f"{stage:10s} job {job_id:>4s}  {record['TRES']:36s} {record['RunTime']}")

    # the stage processes ran inside the jobs and produced the pipeline's outputs ...
    pairs = project / stages.stage_by_name(cfg, "degrade").folder / "pairs.csv"
    assert len(pairs.read_text().splitlines()) > 1
    # ... and their MLflow runs nest under the pipeline run opened on the submit host
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg["tracking"]["experiment"]).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tvt.kind") == "pipeline")
    nested = {r.data.tags["tvt.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert nested == set(registry) and parent.info.status == "FINISHED"

    print(f"\nSLURM pipeline: {len(jobs)} jobs in {seconds:.1f} s (run {run_uuid})\n" + "\n".join(table))


# One job in a dry run: Snakemake's rule block ("rule NAME:") or the rule's message
# ("Job N: NAME: ..."), each with a "resources: k=v, ..." part.
_JOB_HEADER = re.compile(r"^(?:rule (\w+):|Job \d+: (\w+):)", re.MULTILINE)


def _dry_run_requests(output: str) -> dict[str, dict[str, str]]:
    heads = list(_JOB_HEADER.finditer(output))
    requests = {}
    for head, nxt in zip(heads, heads[1:] + [None]):
        block = output[head.end(): nxt.start() if nxt else len(output)]
        found = re.search(r"resources: (.*)", block)
        if found:
            requests[head.group(1) or head.group(2)] = dict(re.findall(r"(\w+)=([^,\s]+)", found.group(1)))
    return requests


@pytest.mark.slow
def test_paper_dry_run_plans_every_stage_with_registry_resources(tmp_path):
    project = _project_copy(tmp_path)  # no datasets, no weights: planning only
    cfg = config.load(ROOT / "config" / "paper.yaml")
    registry = {st.name: st.resources for st in stages.build_stages(cfg)}

    out = _run([SNAKEMAKE, "--profile", "profiles/slurm", "all", "-n", "--configfile", "config/paper.yaml"],
               project).stdout
    total = int(re.search(r"^total\s+(\d+)", out, re.MULTILINE).group(1))
    assert total == len(registry) + 1  # + the `all` target
    requests = _dry_run_requests(out)
    assert set(registry) <= set(requests), f"no resources printed for {sorted(set(registry) - set(requests))}"
    for name, res in registry.items():
        expected = {key: str(value) for key, value in res.snakemake().items()}
        assert {k: requests[name].get(k) for k in expected} == expected, name
    print(f"\npaper DAG: {total} jobs\n" + "\n".join(f"{n:20s} {requests[n]}" for n in registry))
