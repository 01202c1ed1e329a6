"""Orchestration you can trust (issue 15): keyed outputs, code dependencies from the import
graph, config overrides, one instance per stage, no orphan stage processes, a weight cache
found without environment variables, and a README whose cheap commands run as written."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tvt import config, launch, stages
from tvt.config import ConfigError

ROOT = config.REPO_ROOT
CI = config.load(ROOT / "config" / "ci.yaml")
PAPER = config.load(ROOT / "config" / "paper.yaml")


def _keys(cfg) -> dict[str, str]:
    return {st.name: st.key for st in stages.build_stages(cfg)}


# ---- keys -----------------------------------------------------------------------------------


def test_a_key_follows_its_parameters_and_its_inputs_only():
    base = _keys(CI)
    edited = copy.deepcopy(CI)
    edited["evaluate"]["crop_border"] = 2
    assert {n for n, k in _keys(edited).items() if k != base[n]} == {"evaluate"}
    edited = copy.deepcopy(CI)
    edited["degrade"]["final_sinc_prob"] = 0.5  # degrade and everything downstream of it
    changed = {n for n, k in _keys(edited).items() if k != base[n]}
    assert changed == set(base) - {"data", "complexity"}
    edited = copy.deepcopy(CI)
    edited["isr"]["tvt"]["lr"] = 1e-4  # one ablation: the others keep their folders
    assert {n for n, k in _keys(edited).items() if k != base[n]} == {"isr_tvt", "evaluate"}
    assert _keys(copy.deepcopy(CI)) == base  # a copy of one config is the same config
    # every key is distinct and every folder carries its key
    assert len(set(base.values())) == len(base)
    assert all(st.folder.endswith(f"/{st.name}/{st.key}") for st in stages.build_stages(CI))


def test_more_steps_resume_from_the_checkpoints_but_publish_a_new_key():
    before = stages.stage_by_name(CI, "isr_tvt")
    more = copy.deepcopy(CI)
    more["isr"]["tvt"]["steps"] += 10
    after = stages.stage_by_name(more, "isr_tvt")
    assert after.key != before.key and after.ckpt_dir == before.ckpt_dir
    more["isr"]["tvt"]["lr"] = 1e-4  # a different run: its own checkpoints
    assert stages.stage_by_name(more, "isr_tvt").ckpt_dir != before.ckpt_dir
    decaying = copy.deepcopy(CI)  # under a decaying rate, more steps change every update: new checkpoints
    decaying["isr"]["tvt"]["lr_decay"] = "cosine"
    first = stages.stage_by_name(decaying, "isr_tvt")
    decaying["isr"]["tvt"]["steps"] += 10
    assert stages.stage_by_name(decaying, "isr_tvt").ckpt_dir != first.ckpt_dir


def test_editing_an_imported_module_changes_the_key(tmp_path, monkeypatch):
    """Keys hash file contents: a module's edit reaches every stage importing it, nothing else."""
    base = _keys(CI)
    real = stages._file_digest

    def edited(path, mtime_ns, size):
        return "edited" if path == "tvt/degradation.py" else real(path, mtime_ns, size)

    monkeypatch.setattr(stages, "_file_digest", edited)
    changed = {n for n, k in _keys(CI).items() if k != base[n]}
    assert "degrade" in changed and "data" not in changed and "complexity" not in changed


# ---- code dependencies ------------------------------------------------------------------------


def test_code_dependencies_are_the_import_graph():
    """Finding 6: the hand-written lists missed real imports; the derived ones have them."""
    code = {st.name: set(st.code) for st in stages.build_stages(CI)}
    assert "tvt/models/restorer.py" in code["prior"]
    for name in ("prior", "decoder_transfer", "encoder_transfer", "isr_tvt", "stablesr_cfw", "evaluate"):
        assert "tvt/metrics/perceptual.py" in code[name], name  # LPIPS
    assert {"tvt/training/losses.py", "tvt/training/isr.py"} <= code["stablesr_cfw"]  # the GAN, LDM's betas
    assert "tvt/degradation.py" in code["degrade"] and "tvt/degradation.py" not in code["data"]
    for files in code.values():  # orchestration never reruns a stage
        assert not {"tvt/runner.py", "tvt/stages.py", "tvt/tracking.py", "tvt/cli.py"} & files
    # `trains` (declared) agrees with the import graph
    for st in stages.build_stages(CI) + stages.build_stages(PAPER):
        assert st.trains == (launch.ENGINE_SOURCE in st.code), st.name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prior", "stablesr_cfw", "evaluate"])
def test_declared_code_covers_every_module_the_stage_really_imports(name):
    """Import what the handler imports, in a fresh interpreter, and compare with sys.modules."""
    stage = stages.stage_by_name(CI, name)
    func = stages._runner_functions()[stage.handler]
    modules = sorted(stages._imported_modules([func]))
    probe = ("import importlib, json, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "print(json.dumps(sorted(m for m in sys.modules if m == 'tvt' or m.startswith('tvt.'))))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = {m for m in json.loads(proc.stdout.strip().splitlines()[-1]) if m not in stages.ORCHESTRATION_MODULES}
    files = {stages._module_file(m).relative_to(ROOT).as_posix() for m in loaded}
    assert files <= set(stage.code), sorted(files - set(stage.code))


# ---- config: overrides and snapshots --------------------------------------------------------------


def test_overrides_reach_into_sections_and_are_validated():
    cfg = config.load_with_overrides(ROOT / "config" / "ci.yaml", {"isr.tvt.lr": 1e-4, "seed": 7})
    assert cfg["isr"]["tvt"]["lr"] == 1e-4 and cfg["seed"] == 7
    # Snakemake's nested form, its leaves as text: merged into the section and typed
    nested = config.load_with_overrides(ROOT / "config" / "ci.yaml",
                                        {"isr": {"tvt": {"lr": "1e-4"}}, "decoder_transfer": {"transfer": "false"}})
    assert nested["isr"]["tvt"]["lr"] == 1e-4 and nested["decoder_transfer"]["transfer"] is False
    assert {k: v for k, v in nested["isr"]["tvt"].items() if k != "lr"} == \
        {k: v for k, v in CI["isr"]["tvt"].items() if k != "lr"} and nested["isr"]["osediff"] == CI["isr"]["osediff"]
    assert CI["isr"]["tvt"]["lr"] != 1e-4  # the loaded config is not touched
    with pytest.raises(ConfigError, match=r"isr\.tvt\.lrr: unknown key"):
        config.load_with_overrides(ROOT / "config" / "ci.yaml", {"isr.tvt.lrr": 1e-4})
    with pytest.raises(ConfigError, match=r"isr\.tvx is not a section of the config"):
        config.load_with_overrides(ROOT / "config" / "ci.yaml", {"isr.tvx.lr": 1e-4})
    with pytest.raises(ConfigError, match=r"degrade\.scale: 'x' is not|degrade\.scale: expected integer"):
        config.load_with_overrides(ROOT / "config" / "ci.yaml", {"degrade.scale": "x"})


def test_a_snapshot_is_named_by_content(tmp_path):
    a = config.snapshot(CI, tmp_path)
    assert config.snapshot(copy.deepcopy(CI), tmp_path) == a
    assert config.load(a) == CI
    edited = copy.deepcopy(CI)
    edited["seed"] += 1
    assert config.snapshot(edited, tmp_path) != a


# ---- one stage, one process ------------------------------------------------------------------------

HOLD = """
import sys, time, pathlib
from tvt import launch
with launch.exclusive(pathlib.Path(sys.argv[1]), "stage demo"):
    pathlib.Path(sys.argv[1] + ".held").write_text("x")
    time.sleep(60)
"""


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_instance_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    lock = tmp_path / "locks" / "demo.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(Path(f"{lock}.held"))
        with pytest.raises(launch.StageBusyError) as info, launch.exclusive(lock, "stage demo"):
            pass
        message = str(info.value)
        assert "\n" not in message
        assert re.fullmatch(rf"stage demo is already running: PID {holder.pid} on \S+ since "
                            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(lock .*demo\.lock\)", message), message
    finally:
        holder.kill()  # SIGKILL: no clean release, the lock file still names it
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"), launch.exclusive(lock, "stage demo"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a process that is gone (PID {holder.pid}" in caplog.text
    assert lock.read_text() == ""  # released cleanly


@pytest.mark.slow
def test_the_cli_refuses_a_running_stage(tmp_path):
    project = tmp_path
    (project / "config").mkdir()
    (project / "config" / "config.yaml").write_text((ROOT / "config" / "ci.yaml").read_text())
    lock = project / stages.stage_by_name(CI, "data").lock_file
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(Path(f"{lock}.held"))
        proc = subprocess.run([sys.executable, "-m", "tvt", "stage", "data"], cwd=project, capture_output=True, check=False,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: stage data is already running: PID {holder.pid} ")
    assert not (project / stages.stage_by_name(CI, "data").folder).exists()


ORPHAN = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
child.wait()
"""
CHILD = """
import pathlib, signal, sys, time
from tvt import launch
launch.die_with_parent()
def stop(*_):
    pathlib.Path(sys.argv[1]).write_text("terminated")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".ready").write_text("x")
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "watcher-thread"])
def test_a_stage_process_dies_with_its_parent(tmp_path, monkeypatch, pdeathsig):
    """Killing the wrapper (SIGKILL: it cannot pass anything on) ends the stage process, which
    gets SIGTERM (a trainer checkpoints on the way out), by prctl or by the watcher thread."""
    marker = tmp_path / "child"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not pdeathsig:  # the portable fallback alone: the child's prctl is made a no-op
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
        (tmp_path / "sitecustomize.py").write_text(
            "from tvt import launch\nlaunch._set_parent_death_signal = lambda *a: False\n")
    wrapper = subprocess.Popen([sys.executable, "-c", ORPHAN, CHILD, str(marker)], env=env, stdout=subprocess.PIPE,
                               text=True)
    child_pid = int(wrapper.stdout.readline())
    _wait_for(Path(f"{marker}.ready"))
    wrapper.kill()
    wrapper.wait()
    _wait_for(marker, timeout=10)
    assert marker.read_text() == "terminated"
    deadline = time.monotonic() + 10
    while _alive(child_pid):
        assert time.monotonic() < deadline, "the stage process outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "zombie" in status.read_text())


@pytest.mark.slow
def test_a_stale_workflow_file_is_refused(tmp_path):
    """dvc.yaml written for another config (or older code): the stage names the problem, writes nothing."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "ci.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "tvt", "stage", "data", "--key", "0123456789abcdef"], cwd=tmp_path, check=False,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "code changed since the workflow file was written" in last and "expects 0123456789abcdef" in last
    assert not (tmp_path / "resources" / "store").exists()


# ---- engines: retries, dvc.yaml per config -----------------------------------------------------------


def test_retries_are_the_profiles_unless_a_stage_needs_its_own():
    assert all(st.retries is None for st in stages.build_stages(CI))  # the profile's `retries` applies
    paper = {st.name: st.retries for st in stages.build_stages(PAPER)}
    assert paper["isr_tvt"] == stages.TRAINING_RETRIES and paper["evaluate"] is None
    rules = (ROOT / "workflow" / "rules" / "stages.smk").read_text()
    assert "retries: _stage.retries" in rules  # None leaves Snakemake's --retries in charge


def test_dvc_yaml_is_one_file_per_config_whatever_its_spelling(tmp_path, monkeypatch):
    from tvt.runner import write_dvc_yaml

    (tmp_path / "config").mkdir()
    for name in ("config.yaml", "paper.yaml"):
        (tmp_path / "config" / name).write_text((ROOT / "config" / name).read_text())
    monkeypatch.chdir(tmp_path)
    written = []
    for spelling, out in [("config/config.yaml", "a"), (tmp_path / "config" / "config.yaml", "b"),
                          ("./config/../config/config.yaml", "c")]:
        (tmp_path / out).mkdir()
        write_dvc_yaml(spelling, tmp_path / out / "dvc.yaml")
        written.append(((tmp_path / out / "dvc.yaml").read_text(), (tmp_path / out / "params.yaml").read_text()))
    assert written[0] == written[1] == written[2]
    (tmp_path / "paper").mkdir()
    write_dvc_yaml("config/paper.yaml", tmp_path / "paper" / "dvc.yaml")
    assert config.load(tmp_path / "paper" / "params.yaml") == PAPER  # what DVC's stages read
    paper = yaml.safe_load((tmp_path / "paper" / "dvc.yaml").read_text())["stages"]
    assert {f"download_{d}" for d in PAPER["data"]["datasets"]} <= set(paper)  # the paper stages, not mini's
    registry = {st.name: st for st in stages.build_stages(PAPER)}
    for name, st in paper.items():
        assert st["cmd"] == f"python -m tvt stage {name} --config params.yaml --view"
        assert st["params"] == ["mode", "seed", *([registry[name].section] if registry[name].section else [])]
        assert set(registry[name].code) <= set(st["deps"])  # DVC reruns a stage whose code changed


def test_dvc_yaml_carries_no_key_so_dvc_can_change_a_parameter():
    """`dvc exp run -S isr.tvt.lr=1e-4` edits params.yaml only: dvc.yaml must stay valid for the new
    value, while the stage's keyed folder (resolved when it runs) is a new one."""
    tuned = config.load_with_overrides(ROOT / "config" / "ci.yaml", {"isr.tvt.lr": 1e-4, "degrade.scale": 4})
    assert stages.dvc_yaml(tuned) == stages.dvc_yaml(CI)
    assert stages.stage_by_name(tuned, "isr_tvt").key != stages.stage_by_name(CI, "isr_tvt").key
    text = yaml.safe_dump(stages.dvc_yaml(CI))
    assert not any(st.key in text for st in stages.build_stages(CI))


def test_params_yaml_rewritten_by_dvc_reads_back_as_the_config(tmp_path):
    """`dvc exp run -S` rewrites params.yaml in YAML 1.2 (ruamel): the string 'no' unquoted, small
    floats as 1e-07, which YAML 1.1 would read as False and as a string."""
    from dvc.utils.serialize import modify_yaml

    params = tmp_path / "params.yaml"
    params.write_text(stages.render_dvc_params(CI, "config/ci.yaml"))
    with modify_yaml(params) as doc:  # what `-S isr.tvt.lr=1e-7` does
        doc["isr"]["tvt"]["lr"] = 1e-7
    assert ": no\n" in params.read_text()  # DVC's writer leaves the string unquoted
    expected = copy.deepcopy(CI)
    expected["isr"]["tvt"]["lr"] = 1e-7
    assert config.load(params) == expected


def _built_stage(root: Path, key: str, payload: bytes) -> stages.Stage:
    st = dataclasses.replace(stages.stage_by_name(CI, "data"), key=key)
    (root / st.folder / "photos").mkdir(parents=True)
    (root / st.folder / "photos" / "a.png").write_bytes(payload)
    (root / st.folder / "manifest.csv").write_bytes(payload[::-1])
    return st


def test_a_view_links_the_keyed_files_and_whatever_happens_to_it_spares_the_store(tmp_path):
    a, b = _built_stage(tmp_path, "a" * 16, b"config A"), _built_stage(tmp_path, "b" * 16, b"config B")
    a_file = tmp_path / a.folder / "photos" / "a.png"
    before = (a_file.stat().st_mtime_ns, a_file.read_bytes())
    stages.publish_view(a, tmp_path)
    view = tmp_path / a.view
    assert a.view == "resources/dvc/data" and b.view == a.view  # one path for every key
    assert (view / "photos" / "a.png").stat().st_ino == a_file.stat().st_ino  # a link, no copy
    stages.publish_view(b, tmp_path)  # the next experiment: the view now shows B
    assert (view / "photos" / "a.png").read_bytes() == b"config B"
    assert (view / "manifest.csv").read_bytes() == b"config B"[::-1]
    stages.publish_view(a, tmp_path)
    shutil.rmtree(view)  # what DVC does to an output before it reruns its stage
    assert (a_file.stat().st_mtime_ns, a_file.read_bytes()) == before
    assert sorted(p.name for p in view.parent.iterdir()) == []  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="is not built"):
        stages.publish_view(dataclasses.replace(a, key="c" * 16), tmp_path)


def test_after_dvc_pull_a_missing_keyed_folder_is_rebuilt_from_its_view(tmp_path):
    """Another clone has DVC's views (`dvc pull`) but an empty store: the stage's folder comes back
    from the view with the same bytes; a built folder is left alone."""
    a = _built_stage(tmp_path, "a" * 16, b"config A")
    evaluate = dataclasses.replace(stages.stage_by_name(CI, "evaluate"), key="e" * 16)
    for product in evaluate.products:
        path = tmp_path / product
        path.parent.mkdir(parents=True, exist_ok=True)
        if product.endswith("/tables"):
            path.mkdir()
        else:
            path.write_text(product)
    (tmp_path / evaluate.folder / "tables" / "metrics.md").write_text("| psnr |")
    for st in (a, evaluate):
        stages.publish_view(st, tmp_path)
    files = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert not stages.adopt_view(a, tmp_path)  # built: nothing to do
    for st in (a, evaluate):
        shutil.rmtree(tmp_path / st.folder)
        assert stages.adopt_view(st, tmp_path) and st.is_built(tmp_path)
    assert {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    shutil.rmtree(tmp_path / a.view)
    shutil.rmtree(tmp_path / a.folder)
    assert not stages.adopt_view(a, tmp_path)  # no view, no folder: the stage must run


def test_a_dvc_stage_refuses_a_dvc_yaml_that_no_longer_declares_its_code(tmp_path, monkeypatch):
    from tvt.runner import StageError, _check_dvc_entry, write_dvc_yaml

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((ROOT / "config" / "ci.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    write_dvc_yaml("config/config.yaml")
    degrade = stages.stage_by_name(CI, "degrade")
    _check_dvc_entry(CI, degrade, "params.yaml")  # as written: fine
    doc = yaml.safe_load(Path("dvc.yaml").read_text())
    doc["stages"]["degrade"]["deps"].remove("tvt/degradation.py")  # written before that import existed
    Path("dvc.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(StageError, match=r"stage degrade: dvc.yaml does not declare .* regenerate it with "
                                         r"`tvt workflow dvc --config params.yaml`"):
        _check_dvc_entry(CI, degrade, "params.yaml")


# ---- set-up facts ----------------------------------------------------------------------------------------


def test_the_weight_cache_is_found_without_environment_variables(monkeypatch):
    from tvt.weights import default_weights_dir

    monkeypatch.delenv("TVT_WEIGHTS_DIR", raising=False)
    assert default_weights_dir() == ROOT / ".tvt-cache" / "weights"  # what `make weights` fills
    monkeypatch.setenv("TVT_WEIGHTS_DIR", "/elsewhere")
    assert default_weights_dir() == Path("/elsewhere")


def test_the_perceptual_weights_each_training_stage_needs_are_read_from_its_config():
    mini = stages.perceptual_weights_needed(CI, stages.build_stages(CI))
    isr_stages = [f"isr_{name}" for name in CI["isr"]]
    # the mini prior trains without LPIPS (lpips_weight 0); every ISR stage also validates with LPIPS-alex
    assert mini == {"lpips": ["decoder_transfer", "encoder_transfer", *isr_stages, "stablesr_cfw"]}
    paper = stages.perceptual_weights_needed(PAPER, stages.build_stages(PAPER))
    assert paper == {"lpips-vgg": ["decoder_transfer", "encoder_transfer", "isr_tvt", "isr_osediff", "stablesr_cfw"],
                     "lpips": ["isr_tvt", "isr_osediff"]}
    no_lpips = copy.deepcopy(CI)
    no_lpips["decoder_transfer"]["lpips_weight"] = 0
    assert "decoder_transfer" not in stages.perceptual_weights_needed(no_lpips, stages.build_stages(no_lpips))["lpips"]
    # only the stages asked about count (a target that needs no LPIPS needs no weights)
    assert stages.perceptual_weights_needed(CI, [stages.stage_by_name(CI, "data")]) == {}


def test_a_pipeline_without_its_perceptual_weights_is_refused_naming_the_fix(monkeypatch, tmp_path, perceptual_weights):
    every = stages.build_stages(CI)
    monkeypatch.setenv("TVT_WEIGHTS_DIR", str(perceptual_weights))
    assert stages.missing_perceptual_weights(CI, every) is None
    monkeypatch.setenv("TVT_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nor in torchvision's cache
    message = stages.missing_perceptual_weights(CI, every)
    assert "lpips (for decoder_transfer, encoder_transfer" in message
    assert "`tvt weights fetch`" in message and str(tmp_path / "empty") in message
    assert stages.missing_perceptual_weights(CI, [stages.stage_by_name(CI, "data")]) is None


def test_the_dvc_preflight_checks_the_stages_its_targets_may_build():
    """`tvt pipeline --engine dvc -- TARGET` is refused only for what that target needs: its own and its
    upstream stages' weights, not those of stages `dvc repro TARGET` would never run."""
    from tvt.runner import dvc_stages_to_run

    every = [st.name for st in stages.build_stages(CI)]

    def names(args):
        return [st.name for st in dvc_stages_to_run(CI, args)]

    assert names([]) == every and names(["-f"]) == every
    assert names(["degrade"]) == ["data", "degrade"]
    upstream_of_encoder = names(["dvc.yaml:encoder_transfer"])
    assert upstream_of_encoder == ["data", "degrade", "prior", "decoder_transfer", "encoder_transfer"]
    assert names(["-s", "encoder_transfer"]) == ["encoder_transfer"]
    assert names(["prior", "-f"]) == ["data", "degrade", "prior"]
    # what the preflight cannot resolve to stages, it checks in full
    assert names(["nonsense"]) == every and names(["--downstream", "prior"]) == every
    assert names(["dvc.yaml"]) == every
    needs_lpips = stages.perceptual_weights_needed(CI, dvc_stages_to_run(CI, ["encoder_transfer"]))
    assert needs_lpips == {"lpips": ["decoder_transfer", "encoder_transfer"]}
    assert stages.perceptual_weights_needed(CI, dvc_stages_to_run(CI, ["prior"])) == {}


@pytest.mark.slow
def test_version_and_quiet_import():
    proc = subprocess.run([sys.executable, "-m", "tvt", "--version"], capture_output=True, text=True, check=True)
    from importlib.metadata import version

    assert proc.stdout.strip() == f"tvt {version('tvt')}"
    # what a stage imports; bitsandbytes comes with them where a cluster's `pip install` brought it
    # (the lock leaves it out), and must then stay quiet
    probe = ("import logging, tvt.compat as c; c.apply(); import peft, diffusers.models.autoencoders; "
             "assert logging.getLogger('bitsandbytes').getEffectiveLevel() == logging.ERROR")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "bitsandbytes" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_slow_tests_are_marked():
    """The fast tier (`pytest -m "not slow"`) leaves out the end-to-end runs."""
    for path, name in [("test_workflow.py", "test_pipeline_end_to_end"), ("test_slurm.py", None),
                       ("test_launch.py", "test_two_processes_survive_sigterm_resume_and_publish_once")]:
        text = (ROOT / "tests" / path).read_text()
        if name is None:
            assert "pytestmark = pytest.mark.slow" in text or "@pytest.mark.slow" in text, path
        else:
            assert re.search(rf"@pytest\.mark\.slow\n(@[^\n]+\n)*def {name}", text), name
    assert "slow:" in (ROOT / "pyproject.toml").read_text()


#: calls that start a process: an interpreter that imports torch costs seconds, which the fast tier has not got
_SPAWNS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
           "launch.run_forwarding_signals", "launch.relaunch"}


def _unmarked_tests_that_start_processes(path: Path) -> list[str]:
    """Tests of ``path`` outside the slow tier that start a process, directly or through the module's helpers
    and fixtures (or the engines of tests/workflow_support.py)."""
    import ast

    tree = ast.parse(path.read_text())
    marked = lambda node: any("mark.slow" in ast.unparse(d) for d in getattr(node, "decorator_list", []))
    if any(isinstance(n, ast.Assign) and "pytestmark" in ast.unparse(n.targets[0]) and "slow" in ast.unparse(n.value)
           for n in tree.body):
        return []
    spawns = set(_SPAWNS) | {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                             and n.module == "workflow_support" for a in n.names if a.name == "_run"}
    def called(call: ast.Call) -> str:  # `f` or `module.f`
        func = call.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return f"{func.value.id}.{func.attr}"
        return func.id if isinstance(func, ast.Name) else ""

    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    uses = {name: {called(c) for c in ast.walk(f) if isinstance(c, ast.Call)} | {a.arg for a in f.args.args}
            for name, f in functions.items()}
    while grown := {name for name, used in uses.items() if used & spawns} - spawns:  # helpers, fixtures, ...
        spawns |= grown
    return [name for name, f in functions.items() if name.startswith("test_") and name in spawns and not marked(f)]


def test_every_test_that_starts_a_process_is_slow(tmp_path):
    """The fast tier's contract (pyproject.toml): no test in it starts a process."""
    found = {p.name: _unmarked_tests_that_start_processes(p) for p in sorted((ROOT / "tests").glob("test_*.py"))}
    assert not {name: tests for name, tests in found.items() if tests}, "mark these @pytest.mark.slow"
    # the check sees a process started through a fixture of a helper
    probe = tmp_path / "test_probe.py"
    probe.write_text("import subprocess, pytest\n\ndef _go():\n    subprocess.run(['true'])\n\n"
                     "@pytest.fixture\ndef started():\n    _go()\n\ndef test_a(started):\n    pass\n\n"
                     "@pytest.mark.slow\ndef test_b(started):\n    pass\n\ndef test_c():\n    pass\n")
    assert _unmarked_tests_that_start_processes(probe) == ["test_a"]


@pytest.mark.slow
def test_progress_bars_do_not_flood_log_files(tmp_path):
    """A log file (not a TTY) gets a progress update a minute, not one per step."""
    script = ("import time\nfrom tqdm import tqdm\nfrom tvt.runner import quiet_progress_bars\nquiet_progress_bars()\n"
              "for _ in tqdm(range(200), desc='steps'):\n    time.sleep(0.005)\n")
    log = tmp_path / "stage.log"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", script], stderr=fh, check=True,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("TQDM_")},
                            "PYTHONPATH": str(ROOT)})
    text = log.read_text()
    assert "200/200" in text and text.count("\r") <= 3, text.count("\r")
