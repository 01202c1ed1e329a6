"""The workflow: Snakemake and DVC built from one registry, cached stages, MLflow nesting.

The end-to-end test runs the real stages (data -> degrade -> evaluate) on the CI-sized
config in a scratch copy of the project, then checks what a user relies on: a second run
does nothing, an evaluation-only change reruns only evaluation (asked of Snakemake's and
DVC's own dry-runs), and every stage is an MLflow run nested under the pipeline run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tvt import config, stages

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("TVT_PIPELINE_RUN_ID", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _project_copy(dest: Path, cfg_name: str = "ci.yaml") -> Path:
    """A scratch copy of the project with ``config/<cfg_name>`` as its config.yaml."""
    for item in ("Snakefile", "workflow", "config", "tvt", "profiles"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / item)
    shutil.copy2(ROOT / "config" / cfg_name, dest / "config" / "config.yaml")
    cfg = config.load(dest / "config" / "config.yaml")
    (dest / "dvc.yaml").write_text(stages.render_dvc_yaml(cfg))
    return dest


def _registry_edges(cfg) -> set[tuple[str, str]]:
    producers = {out: st.name for st in stages.build_stages(cfg) for out in st.outs + st.metrics}
    return {(producers[d], st.name) for st in stages.build_stages(cfg) for d in st.deps if d in producers}


def _snakemake_edges(project: Path, configfile: str) -> set[tuple[str, str]]:
    out = _run([str(BIN / "snakemake"), "all", "--d3dag", "--forceall", "--configfile", configfile], project).stdout
    dag = json.loads(out[out.index("{"):])
    rule = {n["id"]: n["value"]["rule"] for n in dag["nodes"]}
    return {(rule[e["u"]], rule[e["v"]]) for e in dag["edges"] if rule[e["v"]] != "all"}


def _dvc_edges(project: Path) -> set[tuple[str, str]]:
    doc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    producers = {next(iter(o)) if isinstance(o, dict) else o: name
                 for name, st in doc.items() for o in st.get("outs", []) + st.get("metrics", [])}
    return {(producers[d], name) for name, st in doc.items() for d in st.get("deps", []) if d in producers}


def test_committed_dvc_yaml_matches_registry():
    cfg = config.load(ROOT / "config" / "config.yaml")
    assert (ROOT / "dvc.yaml").read_text() == stages.render_dvc_yaml(cfg), \
        "dvc.yaml drifted from tvt/stages.py: run `tvt workflow dvc`"


@pytest.mark.parametrize("cfg_name", ["config.yaml", "paper.yaml"])
def test_snakemake_and_dvc_build_the_same_dag(tmp_path, cfg_name):
    project = _project_copy(tmp_path, cfg_name)
    cfg = config.load(project / "config" / "config.yaml")
    expected = _registry_edges(cfg)
    assert expected, "registry has no dependencies"
    assert _snakemake_edges(project, "config/config.yaml") == expected
    assert _dvc_edges(project) == expected
    # the commands agree too: each DVC cmd is what the Snakemake rule runs
    dry = _run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "all"], project).stdout
    for name, st in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        assert st["cmd"] in dry, f"{name}: {st['cmd']!r} not among Snakemake's commands"
    if cfg_name == "paper.yaml":  # every paper dataset gets its own verified download stage
        names = {s.name for s in stages.build_stages(cfg)}
        assert {f"download_{d}" for d in cfg["data"]["datasets"]} <= names


def _job_stats(dry_run_output: str) -> set[str]:
    block = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", block, re.MULTILINE)} - {"job", "all"}


@pytest.mark.slow
def test_pipeline_end_to_end_cached_and_tracked(tmp_path, perceptual_weights):
    project = _project_copy(tmp_path)
    sm = str(BIN / "snakemake")
    env = {"TVT_WEIGHTS_DIR": str(perceptual_weights)}

    _run([sm, "--cores", "2", "all"], project, **env)
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    bicubic = metrics["subsets"]["all"]["bicubic"]
    assert bicubic["n"] > 0 and 8 < bicubic["psnr_y"] < 40 and 0 < bicubic["ssim_y"] < 1
    assert (project / "results" / "tables" / "metrics.md").read_text().count("| bicubic |") >= 2

    # MLflow: one parent run, every stage nested under it, with its own section only
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tvt-ci")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tvt.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["tvt.stage"]: r for r in runs if r.data.tags.get("tvt.kind") == "stage"}
    assert set(children) == {s.name for s in stages.build_stages(config.load(project / "config" / "config.yaml"))}
    assert {"data", "degrade", "prior", "decoder_transfer", "encoder_transfer", "evaluate"} <= set(children)
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["tvt.config_hash"]) == 16
    assert "degrade.scale" in children["degrade"].data.params
    assert not any(k.startswith("degrade.") for k in children["evaluate"].data.params)
    assert children["evaluate"].data.metrics["all.bicubic.psnr_y"] == pytest.approx(bicubic["psnr_y"])

    # a second run does nothing and says so
    assert "Nothing to be done" in _run([sm, "-n", "all"], project).stdout

    # DVC sees the same stages: adopting Snakemake's outputs leaves it nothing to do, which
    # shows that every stage's deps, params and outs are declared identically
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], project)
    _run([dvc, "commit", "--force", "--quiet"], project)
    assert "up to date" in _run([dvc, "repro"], project, **env).stdout
    shown = json.loads(_run([dvc, "metrics", "show", "--json"], project).stdout)
    assert json.dumps(shown).count(str(round(bicubic["psnr_y"], 4))[:6]) >= 1  # `dvc metrics show` reads it
    plots = _run([dvc, "plots", "show", "--json"], project).stdout
    assert "ocr_acc_vs_text_px" in plots

    # an evaluation-only change reruns only evaluation, for both engines
    cfg_file = project / "config" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("crop_border: 4", "crop_border: 2"))
    assert _job_stats(_run([sm, "-n", "all"], project).stdout) == {"evaluate"}
    status = _run([dvc, "status", "--json"], project).stdout
    assert set(json.loads(status)) == {"evaluate"}
    repro = _run([dvc, "repro"], project, **env).stdout  # DVC really runs the stage
    assert "Running stage 'evaluate'" in repro and "Running stage 'degrade'" not in repro
    assert json.loads((project / "results" / "metrics.json").read_text())["crop_border"] == 2
    # ... while a degradation change reruns degradation and exactly what depends on it
    cfg_file.write_text(cfg_file.read_text().replace("final_sinc_prob: 0.8", "final_sinc_prob: 0.5"))
    edges = _registry_edges(config.load(cfg_file))
    downstream = {"degrade"}
    while grown := {v for u, v in edges if u in downstream} - downstream:
        downstream |= grown
    assert {"prior", "evaluate"} <= downstream and "data" not in downstream
    assert _job_stats(_run([sm, "-n", "all"], project).stdout) == downstream
