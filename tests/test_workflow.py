"""The workflow: Snakemake and DVC built from one registry, keyed outputs, MLflow nesting.

The end-to-end test runs the real stages on the CI-sized config in a scratch copy of the
project, the way the README runs them (no activated environment, no TVT_WEIGHTS_DIR), then
checks what a user relies on: the same config is a no-op however it is named and through
either engine; an evaluation-only change reruns only evaluation; a failed invocation of another
config destroys nothing; switching configs A -> B -> A reruns nothing; every stage is an MLflow
run nested under the pipeline run; `dvc exp run -S` trains a new key beside the committed
baseline, `dvc exp show` compares both, and the baseline's folders keep their bytes and mtimes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from workflow_support import BIN, DVC, ROOT, SNAKEMAKE, TVT, _project_copy, _run

from tvt import config, stages

CI_CFG = config.load(ROOT / "config" / "ci.yaml")


def _registry_edges(cfg) -> set[tuple[str, str]]:
    return {(need, st.name) for st in stages.build_stages(cfg) for need in st.needs}


def _snakemake_edges(project: Path, configfile: str) -> set[tuple[str, str]]:
    out = _run([*SNAKEMAKE, "all", "--d3dag", "--forceall", "--configfile", configfile], project).stdout
    dag = json.loads(out[out.index("{"):])
    rule = {n["id"]: n["value"]["rule"] for n in dag["nodes"]}
    return {(rule[e["u"]], rule[e["v"]]) for e in dag["edges"] if rule[e["v"]] != "all"}


def _dvc_edges(project: Path) -> set[tuple[str, str]]:
    doc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    producers = {next(iter(o)) if isinstance(o, dict) else o: name
                 for name, st in doc.items() for o in st.get("outs", []) + st.get("metrics", []) + st.get("plots", [])}
    return {(producers[d], name) for name, st in doc.items() for d in st.get("deps", []) if d in producers}


@pytest.mark.slow
@pytest.mark.parametrize("cfg_name", ["config.yaml", "paper.yaml"])
def test_snakemake_and_dvc_build_the_same_dag(tmp_path, cfg_name):
    project = _project_copy(tmp_path, cfg_name)
    cfg = config.load(project / "config" / "config.yaml")
    expected = _registry_edges(cfg)
    assert expected, "registry has no dependencies"
    assert _snakemake_edges(project, "config/config.yaml") == expected
    _run([*TVT, "workflow", "dvc"], project)
    assert _dvc_edges(project) == expected
    # the commands agree too: DVC's stage reads params.yaml, the config itself, so it computes the key
    # that Snakemake's rule carries, and runs it on the project's interpreter
    assert config.load(project / "params.yaml") == cfg
    dry = _run([*SNAKEMAKE, "-n", "-p", "--forceall", "all"], project).stdout
    for name, st in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        assert st["cmd"] == f"python -m tvt stage {name} --config params.yaml --view"
        key = stages.stage_by_name(cfg, name).key
        assert f'exec "$TVT_PYTHON" -m tvt stage {name} --config "$TVT_CONFIG_SNAPSHOT" --key {key} ' in dry, \
            f"{name}: key {key} not among Snakemake's commands"
    if cfg_name == "paper.yaml":  # every paper dataset gets its own verified download stage
        names = {s.name for s in stages.build_stages(cfg)}
        assert {f"download_{d}" for d in cfg["data"]["datasets"]} <= names


@pytest.mark.slow
def test_config_overrides_are_snakemakes_own_idiom(tmp_path):
    """`--config` enters the keys (finding 5: it used to be silently ignored), merged into its section."""
    project = _project_copy(tmp_path)
    dry = _run([*SNAKEMAKE, "-n", "-p", "all", "--config", "isr={tvt: {lr: 1e-4}}"], project).stdout
    base = config.load(project / "config" / "config.yaml")
    edited = config.load_with_overrides(project / "config" / "config.yaml", {"isr.tvt.lr": 1e-4})
    assert stages.stage_by_name(edited, "isr_tvt").folder in dry
    assert stages.stage_by_name(base, "isr_tvt").folder not in dry
    assert stages.stage_by_name(base, "isr_osediff").folder in dry  # the rest of the section is kept
    bad = _run([*SNAKEMAKE, "-n", "all", "--config", "isr={tvt: {lrr: 1e-4}}"], project, ok=False)
    assert bad.returncode != 0 and "config error:" in bad.stderr and "isr.tvt.lrr: unknown key" in bad.stderr


@pytest.mark.slow
def test_a_pipeline_without_perceptual_weights_stops_before_its_first_job(tmp_path):
    """A fresh clone that skipped `make setup` is told so up front (Snakemake, and DVC through `tvt pipeline`),
    not by decoder_transfer after the data and prior stages; a dry run and a target that needs no LPIPS still
    go through."""
    project = _project_copy(tmp_path / "project")  # no .tvt-cache/weights
    torch_home = str(tmp_path / "torch")  # nor torchvision's cache
    refused = _run([*SNAKEMAKE, "--cores", "1", "all"], project, ok=False, TORCH_HOME=torch_home)
    assert refused.returncode != 0
    assert "preflight: the perceptual weights these stages train with are missing: lpips (for decoder_transfer" \
        in refused.stdout + refused.stderr
    assert "`tvt weights fetch`" in refused.stdout + refused.stderr
    assert not (project / "resources" / "store").exists()  # no job ran
    refused = _run([*TVT, "pipeline", "--engine", "dvc"], project, ok=False, TORCH_HOME=torch_home)
    assert refused.returncode == 1 and "preflight: the perceptual weights" in refused.stderr
    assert not (project / "resources" / "store").exists()
    _run([DVC, "init", "--no-scm", "-q"], project)
    # a dry run is not checked (DVC itself stops at the first stage whose input is not built yet)
    dry = _run([*TVT, "pipeline", "--engine", "dvc", "--", "--dry"], project, ok=False, TORCH_HOME=torch_home)
    assert "Running stage 'data'" in dry.stdout and "preflight" not in dry.stderr
    assert not (project / "resources" / "store").exists()
    # a target that trains without LPIPS runs
    _run([*TVT, "pipeline", "--engine", "dvc", "--", "data"], project, TORCH_HOME=torch_home)
    assert stages.stage_by_name(config.load(project / "config" / "config.yaml"), "data").is_built(project)
    _run([*SNAKEMAKE, "-n", "all"], project, TORCH_HOME=torch_home)
    _run([*SNAKEMAKE, "--cores", "1", "complexity"], project, TORCH_HOME=torch_home)
    assert stages.stage_by_name(config.load(project / "config" / "config.yaml"), "complexity").is_built(project)


def _job_stats(dry_run_output: str) -> set[str]:
    if "Job stats:" not in dry_run_output:
        return set()
    block = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", block, re.MULTILINE)} - {"job", "all"}


def _tree_state(project: Path) -> dict[str, tuple[float, int]]:
    """mtime and size of every file of the store: what must not change when nothing reruns."""
    return {str(p.relative_to(project)): (p.stat().st_mtime, p.stat().st_size)
            for base in ("resources/store", "results/store") for p in (project / base).rglob("*") if p.is_file()}


def _experiments(shown: list[dict]) -> list[tuple[float, dict]]:
    """(``isr.tvt.lr``, evaluation metrics) of the baseline commit and of each experiment in
    ``dvc exp show --json``."""
    revs = [row for row in shown if row["rev"] != "workspace"]
    revs += [rev for row in revs for exp in row.get("experiments") or [] for rev in exp["revs"]]
    out = []
    for rev in revs:
        data = rev["data"]
        metrics = data["metrics"][stages.stage_by_name(CI_CFG, "evaluate").view + "/metrics.json"]["data"]
        out.append((data["params"]["params.yaml"]["data"]["isr"]["tvt"]["lr"], metrics))
    return out


def _timed(cmd, project, **env) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = _run(cmd, project, **env)
    return time.perf_counter() - start, proc


@pytest.mark.slow
def test_pipeline_end_to_end_keyed_cached_and_tracked(ci_pipeline):
    project = ci_pipeline.fresh()  # `snakemake --cores 2 all` on config/ci.yaml, as the README runs it
    cfg = config.load(project / "config" / "config.yaml")
    registry = {st.name: st for st in stages.build_stages(cfg)}
    results = project / registry["evaluate"].folder
    metrics = json.loads((results / "metrics.json").read_text())
    bicubic = metrics["subsets"]["all"]["bicubic"]
    assert bicubic["n"] > 0 and 8 < bicubic["psnr_y"] < 40 and 0 < bicubic["ssim_y"] < 1
    assert (results / "tables" / "metrics.md").read_text().count("| bicubic |") >= 2
    # the newest run's outputs under stable names
    assert (project / "results" / "latest").resolve() == results.resolve()
    assert (project / "resources" / "models" / "tvt").resolve() == (project / registry["isr_tvt"].folder).resolve()

    # MLflow: one parent run, every stage nested under it, with its own section only
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tvt-ci")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tvt.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["tvt.stage"]: r for r in runs if r.data.tags.get("tvt.kind") == "stage"}
    assert set(children) == set(registry)
    for name, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["tvt.key"] == registry[name].key
    assert "degrade.scale" in children["degrade"].data.params
    assert not any(k.startswith("degrade.") for k in children["evaluate"].data.params)
    assert children["evaluate"].data.metrics["all.bicubic.psnr_y"] == pytest.approx(bicubic["psnr_y"])
    # every trained restorer scored is a registered MLflow model, one version, from its comparison run
    trained = [m for m in cfg["evaluate"]["methods"] if stages.method_stage(m)]
    for method in trained:
        (version,) = client.search_model_versions(f"name = 'tvt-{cfg['mode']}-{method}'")
        assert client.get_run(version.run_id).info.run_name == f"{method} · all"
    assert metrics["restorers"] == {m: registry[stages.method_stage(m)].folder for m in trained}

    # the report, Snakemake's own: tables as HTML, comparison grids, figures, one curve per training stage
    _run([*SNAKEMAKE, "--report", "report.html"], project)
    from tvt.report_assets import data_uri_bytes, report_contents

    embedded, categories = report_contents((project / "report.html").read_text())
    shown = {c: sorted(Path(p).name for paths in sub.values() for p in paths) for c, sub in categories.items()}
    training = sorted(st.name for st in registry.values() if st.trains)
    assert shown["Training curves"] == [f"{name}.svg" for name in training]
    assert {"table2_all.html", "table3_text.html", "table4_complexity.html"} <= set(shown["Tables"])
    assert shown["Comparison grids"] and all(n.startswith("compare_") for n in shown["Comparison grids"])
    by_name = {Path(p).name: entry for p, entry in embedded.items()}
    table2 = data_uri_bytes(by_name["table2_all.html"]["data_uri"]).decode()
    assert "<table>" in table2 and "<td>bicubic</td>" in table2
    for name in training:  # a real curve (axes with data), not the "no logged curve" placeholder
        svg = data_uri_bytes(by_name[f"{name}.svg"]["data_uri"]).decode()
        assert svg.count('id="line2d_') >= 1 and "no logged training curve" not in svg, name

    # finding 2: the same config is a no-op however it is named, through either engine
    finished = _tree_state(project)
    seconds = {}
    for label, cmd in [("relative", [*SNAKEMAKE, "--cores", "2", "all"]),
                       ("--configfile", [*SNAKEMAKE, "--cores", "2", "all", "--configfile", "config/config.yaml"]),
                       ("absolute", [*SNAKEMAKE, "--cores", "2", "all", "--configfile",
                                     str(project / "config" / "config.yaml")]),
                       ("tvt pipeline", [*TVT, "pipeline", "--config", str(project / "config" / "config.yaml")])]:
        seconds[label], proc = _timed(cmd, project)
        assert "Nothing to be done" in proc.stdout + proc.stderr, label
    # DVC, in a git repository (its experiments are commits): the first run adopts Snakemake's
    # outputs (every stage finds its keyed folder built and only publishes its view); after that
    # `tvt pipeline --engine dvc` with any spelling writes the same dvc.yaml and params.yaml and
    # leaves DVC nothing to do
    shutil.copy2(ROOT / ".gitignore", project / ".gitignore")
    _run(["git", "init", "-q"], project)
    for key, value in (("user.name", "tvt tests"), ("user.email", "tests@tvt.invalid")):  # DVC commits experiments
        _run(["git", "config", key, value], project)
    _run([DVC, "init", "-q"], project)
    seconds["dvc adopts"], proc = _timed([*TVT, "pipeline", "--engine", "dvc"], project)
    assert all(f"{name}: up to date" in proc.stderr for name in registry), proc.stderr[-3000:]
    for label, path in [("dvc", "config/config.yaml"), ("dvc absolute", str(project / "config" / "config.yaml"))]:
        seconds[label], proc = _timed([*TVT, "pipeline", "--engine", "dvc", "--config", path], project)
        assert "Running stage" not in proc.stdout and "up to date" in proc.stdout, proc.stdout[-2000:]
    assert _tree_state(project) == finished
    print("no-op seconds:", json.dumps({k: round(v, 2) for k, v in seconds.items()}))
    shown = json.loads(_run([DVC, "metrics", "show", "--json"], project).stdout)
    assert json.dumps(shown).count(str(round(bicubic["psnr_y"], 4))[:6]) >= 1  # `dvc metrics show` reads it

    # an evaluation-only change (config B) reruns only evaluation ...
    cfg_file = project / "config" / "config.yaml"
    a_text = cfg_file.read_text()
    b_text = a_text.replace("crop_border: 4", "crop_border: 2")
    cfg_file.write_text(b_text)
    assert _job_stats(_run([*SNAKEMAKE, "-n", "all"], project).stdout) == {"evaluate"}
    # finding 3: an invocation of another config that fails at once destroys nothing. Here a
    # retrained TVT (`--config`) whose training stage cannot start: Snakemake used to delete the
    # finished model before running its job
    cfg_file.write_text(a_text)
    broken = _run([*SNAKEMAKE, "--cores", "2", "all", "--config", "isr={tvt: {lr: 1e-4}}"], project, ok=False,
                  TVT_NUM_PROCESSES="not-a-number")
    assert broken.returncode != 0 and "TVT_NUM_PROCESSES='not-a-number'" in broken.stdout + broken.stderr
    assert _tree_state(project) == finished
    dry = _run([*SNAKEMAKE, "-n", "all"], project)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    cfg_file.write_text(b_text)
    # ... B for real, through DVC this time: only evaluate runs, into its own folder
    repro = _run([*TVT, "pipeline", "--engine", "dvc"], project).stdout
    assert "Running stage 'evaluate'" in repro and "Running stage 'degrade'" not in repro
    b_eval = project / stages.stage_by_name(config.load(cfg_file), "evaluate").folder
    assert json.loads((b_eval / "metrics.json").read_text())["crop_border"] == 2
    assert {k: v for k, v in _tree_state(project).items() if k in finished} == finished  # A untouched
    # A -> B -> A: nothing reruns, A's results are the current ones again
    cfg_file.write_text(a_text)
    again = _run([*SNAKEMAKE, "--cores", "2", "all"], project)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert (project / "results" / "latest").resolve() == results.resolve()
    # a degradation change reruns degradation and exactly what depends on it
    cfg_file.write_text(a_text.replace("final_sinc_prob: 0.8", "final_sinc_prob: 0.5"))
    edges = _registry_edges(config.load(cfg_file))
    downstream = {"degrade"}
    while grown := {v for u, v in edges if u in downstream} - downstream:
        downstream |= grown
    assert {"prior", "evaluate"} <= downstream and "data" not in downstream
    assert _job_stats(_run([*SNAKEMAKE, "-n", "all"], project).stdout) == downstream

    # finding 5, DVC's own idiom: `dvc exp run -S` retrains one model under a new key beside the
    # committed baseline A, `dvc exp show` compares them, A's folders keep their bytes and mtimes,
    # and setting the value back (B -> A) trains nothing
    cfg_file.write_text(a_text)
    _run([*TVT, "pipeline", "--engine", "dvc"], project)  # params.yaml and the views back to A: nothing runs
    baseline = _tree_state(project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-q", "-m", "baseline: config A"], project)
    activated = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # `source .venv/bin/activate`
    exp = _run([DVC, "exp", "run", "-S", "isr.tvt.lr=2e-4"], project, **activated)
    assert "Running stage 'isr_tvt'" in exp.stdout and "Running stage 'degrade'" not in exp.stdout, exp.stdout[-3000:]
    tuned = {st.name: st for st in stages.build_stages(config.load_with_overrides(cfg_file, {"isr.tvt.lr": 2e-4}))}
    assert tuned["isr_tvt"].key != registry["isr_tvt"].key and tuned["isr_tvt"].is_built(project)
    assert {k: v for k, v in _tree_state(project).items() if k in baseline} == baseline  # A untouched
    rows = _experiments(json.loads(_run([DVC, "exp", "show", "--json"], project).stdout))
    psnr = {lr: m["subsets"]["all"]["tvt"]["psnr_y"] for lr, m in rows}
    assert set(psnr) == {cfg["isr"]["tvt"]["lr"], 2e-4}, rows
    for lr, folder in ((cfg["isr"]["tvt"]["lr"], results), (2e-4, project / tuned["evaluate"].folder)):
        assert psnr[lr] == json.loads((folder / "metrics.json").read_text())["subsets"]["all"]["tvt"]["psnr_y"]
    assert psnr[2e-4] != psnr[cfg["isr"]["tvt"]["lr"]]  # another model, other outputs
    tuned_state = _tree_state(project)
    back = _run([DVC, "exp", "run", "-S", f"isr.tvt.lr={cfg['isr']['tvt']['lr']!r}"], project, **activated)
    assert "Running stage 'degrade'" not in back.stdout and _tree_state(project) == tuned_state, back.stdout[-3000:]
