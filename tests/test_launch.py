"""Training stages on every granted GPU: ``tvt stage`` relaunches itself under ``accelerate launch``.

The integration tests run the real ``decoder_transfer`` stage with ``TVT_NUM_PROCESSES=2`` on
CPU (two gloo ranks), as Snakemake or a SLURM job would call it, in a scratch project: both
ranks train, one MLflow run and one output appear, the checkpoint holds both ranks' RNG
states, a second call resumes instead of retraining, failures and SIGTERM reach the caller.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tvt import compat

compat.apply()

from diffusers import AutoencoderKL
from safetensors.torch import load_file
from training_support import make_pairs_dir, one_thread  # noqa: F401

from tvt import config, launch, stages
from tvt.models.sd_configs import MINI_VAE_D8
from tvt.models.vae_d4 import VAED4

STAGE = "decoder_transfer"
CI = config.load(config.REPO_ROOT / "config" / "ci.yaml")
PAIRS_DIR = Path(stages.stage_by_name(CI, "degrade").folder)
SD_DIR = Path(stages.stage_by_name(CI, "prior").folder)


# ---- the pure decisions ---------------------------------------------------------------


def test_number_of_processes():
    assert launch.wanted_processes({}, 0) == 1  # CPU job: no relaunch
    assert launch.wanted_processes({}, 1) == 1
    assert launch.wanted_processes({}, 8) == 8  # every GPU SLURM made visible
    assert launch.wanted_processes({"SLURM_GPUS_ON_NODE": "2"}, 8) == 2  # a node that does not hide the others
    assert launch.wanted_processes({"SLURM_GPUS_ON_NODE": "8"}, 4) == 4
    assert launch.wanted_processes({"TVT_NUM_PROCESSES": "2"}, 0) == 2  # CPU processes
    assert launch.wanted_processes({"TVT_NUM_PROCESSES": "1", "SLURM_GPUS_ON_NODE": "8"}, 8) == 1
    with pytest.raises(launch.LaunchError, match="TVT_NUM_PROCESSES='two': expected a whole number"):
        launch.wanted_processes({"TVT_NUM_PROCESSES": "two"}, 0)
    with pytest.raises(launch.LaunchError, match="TVT_NUM_PROCESSES=4 but only 2 GPU"):
        launch.wanted_processes({"TVT_NUM_PROCESSES": "4"}, 2)


def test_a_cpu_stage_computes_with_the_threads_it_was_granted():
    """Snakemake exports a rule's ``threads`` as OMP_NUM_THREADS: a 1-thread mini stage keeps to one core, so
    two of them share a 2-core machine instead of each spinning on both; never more than the usable cores."""
    from tvt.runner import granted_threads
    from tvt.stages import training_resources

    cores = len(os.sched_getaffinity(0))
    assert granted_threads({"OMP_NUM_THREADS": "1"}) == 1
    assert granted_threads({"OMP_NUM_THREADS": str(cores + 7)}) == cores
    for unset in ({}, {"OMP_NUM_THREADS": ""}, {"OMP_NUM_THREADS": "0"}, {"OMP_NUM_THREADS": "four"}):
        assert granted_threads(unset) == cores, unset
    assert training_resources(paper=False, runtime_min=60).cpus == 1  # what --cores N runs N of


def test_launched_processes_are_recognised():
    assert not launch.inside_distributed_launch({})
    # plain configuration is not a launch
    assert not launch.inside_distributed_launch({"ACCELERATE_MIXED_PRECISION": "bf16", "SLURM_JOB_ID": "7"})
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "ACCELERATE_DYNAMO_MODE"):
        assert launch.inside_distributed_launch({name: "0"}), name


def test_training_stages_are_the_ones_using_the_trainer():
    cfg = config.load(config.REPO_ROOT / "config" / "ci.yaml")
    every = {st.name for st in stages.build_stages(cfg)}
    training = {name for name in every if launch.uses_trainer(stages.stage_by_name(cfg, name))}
    assert {"prior", "decoder_transfer", "encoder_transfer", "isr_tvt", "isr_osediff"} <= training
    assert training == every - {"data", "degrade", "complexity", "evaluate"}
    paper = config.load(config.REPO_ROOT / "config" / "paper.yaml")
    assert not launch.uses_trainer(stages.stage_by_name(paper, "prior"))  # a download there


def test_accelerate_command():
    cmd = launch.accelerate_command(8, ["stage", STAGE, "--config", "c.yaml"], threads_per_process=2, python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    flags = dict(zip(cmd[4:-4:2], cmd[5:-4:2]))
    assert cmd[3] == "--multi_gpu" and flags == {
        "--num_processes": "8", "--num_machines": "1", "--main_process_port": "0", "--mixed_precision": "no",
        "--dynamo_backend": "no", "--num_cpu_threads_per_process": "2", "--module": "tvt"}
    assert cmd[-4:] == ["stage", STAGE, "--config", "c.yaml"]
    assert launch.launch_environment({"A": "1"}, use_cpu=True) == {"A": "1", "ACCELERATE_USE_CPU": "true"}
    assert launch.launch_environment({"A": "1"}, use_cpu=False) == {"A": "1"}
    with pytest.raises(ValueError):
        launch.accelerate_command(1, ["stage", STAGE])


@pytest.mark.slow
def test_exit_status_and_signals_reach_the_caller(tmp_path):
    assert launch.run_forwarding_signals([sys.executable, "-c", "raise SystemExit(3)"], os.environ) == 3
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    assert launch.run_forwarding_signals(killed, os.environ) == 128 + signal.SIGKILL
    # a SIGTERM to the caller reaches the child, which reports it; the caller returns 143
    marker = tmp_path / "got-term"
    child = (f"import signal, sys, time, pathlib\n"
             f"def stop(*_): pathlib.Path({str(marker)!r}).write_text('x'); sys.exit(1)\n"
             f"signal.signal(signal.SIGTERM, stop)\n"
             f"pathlib.Path({str(marker)!r} + '.ready').write_text('x'); time.sleep(60)")
    import threading

    def terminate_when_ready():
        while not Path(f"{marker}.ready").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    assert launch.run_forwarding_signals([sys.executable, "-c", child], os.environ) == 128 + signal.SIGTERM
    assert marker.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back


# ---- the real stage on two CPU processes ----------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project: the CI config's decoder transfer (tiny), pairs, a random mini 'SD' VAE."""
    root = tmp_path_factory.mktemp("launch")
    (root / "config").mkdir()
    make_pairs_dir(root / PAIRS_DIR, 32, {"train": 8, "val": 2}, seed=0)
    torch.manual_seed(0)
    AutoencoderKL(**MINI_VAE_D8).save_pretrained(root / SD_DIR / "vae")
    return root


def write_config(project: Path, steps: int, **section) -> str:
    cfg = yaml.safe_load((config.REPO_ROOT / "config" / "ci.yaml").read_text())
    cfg[STAGE].update(steps=steps, batch_size=2, lpips_weight=0.0, disc_start=2, disc_channels=8,
                      checkpoint_every=2, keep_checkpoints=2, log_every=2, sample_every=4, **section)
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return "config/config.yaml"


def tvt_stage(project: Path, processes: int = 2, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k not in ("TVT_PIPELINE_RUN_ID", "MLFLOW_TRACKING_URI")}
    env.update(TVT_NUM_PROCESSES=str(processes), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "-m", "tvt", "stage", STAGE, "--config", "config/config.yaml"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def stage_runs(project: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tvt-ci")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def newest_step(ckpt_dir: Path) -> int:
    from tvt.training.engine import latest_checkpoint

    newest = latest_checkpoint(ckpt_dir)
    return int(newest.name.split("-")[1]) if newest else 0


@pytest.mark.slow
def test_two_processes_survive_sigterm_resume_and_publish_once(project):
    """SIGTERM (SLURM preemption) -> resume on two processes to the end -> a rerun trains nothing."""
    import psutil

    write_config(project, steps=500)
    # keyed by the stage's section without `steps`: the checkpoints survive an edit of the step count
    ckpt_rel = Path(stages.stage_by_name(config.load(project / "config" / "config.yaml"), STAGE).ckpt_dir)
    ckpt_dir = project / ckpt_rel
    victim = tvt_stage(project, wait=False)
    deadline = time.monotonic() + 240
    while newest_step(ckpt_dir) < 2:
        assert victim.poll() is None, victim.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "no checkpoint-2 within 240 s"
        time.sleep(0.05)
    ranks = psutil.Process(victim.pid).children(recursive=True)  # the launcher and its two ranks
    victim.send_signal(signal.SIGTERM)  # to the parent only: it must pass it on
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    assert len(ranks) >= 3 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    for rank in (0, 1):  # both ranks had trained
        assert f"{STAGE}: process {rank} of 2 on cpu" in stderr, stderr[-4000:]
    killed_at = newest_step(ckpt_dir)
    assert 2 <= killed_at < 500
    assert f"SIGTERM received; stopped after step {killed_at}" in stderr  # checkpointed on the way out

    write_config(project, steps=killed_at + 2)  # `steps` is bookkeeping: the checkpoints stay valid
    resumed = tvt_stage(project)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    resume_line = f"resumed from {ckpt_rel / f'checkpoint-{killed_at}'} (step {killed_at})"
    assert resumed.stderr.count(resume_line) == 2, resumed.stderr[-4000:]  # on both ranks

    end = killed_at + 2
    ckpt = ckpt_dir / f"checkpoint-{end}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == end
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}  # one per rank
    # the VAE (wrapped in a Call: keys "model.*") checkpointed lean: decoder only, not the frozen encoder
    stored = {k.removeprefix("model."): v for k, v in load_file(ckpt / "model.safetensors").items()}
    assert stored and all(k.startswith(("decoder.", "post_quant_conv.")) for k in stored), list(stored)[:4]

    out = project / stages.stage_by_name(config.load(project / "config" / "config.yaml"), STAGE).folder
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no leftover .tmp
    decoder = VAED4.from_pretrained(out)
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in stored.items())  # published = checkpointed

    client, runs = stage_runs(project)  # one run per invocation: rank 0's, never the parent's or rank 1's
    assert [r.info.run_name for r in runs] == [STAGE, STAGE] and runs[1].info.status == "FINISHED"
    losses = client.get_metric_history(runs[1].info.run_id, f"{STAGE}/loss")
    # only the two steps after the checkpoint (logged every 2 steps and at the end); the SIGTERM
    # checkpoint may sit at an odd step, between two periodic ones
    assert [m.step for m in losses] == [s for s in (killed_at + 1, end) if s % 2 == 0 or s == end]
    assert runs[1].data.metrics[f"{STAGE}/samples_per_s"] > 0

    again = tvt_stage(project)  # a finished key is never rebuilt: no launch, no run, nothing written
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{STAGE}: up to date ({out.relative_to(project)})" in again.stderr and "process 0 of 2" not in again.stderr
    _, runs = stage_runs(project)
    assert len(runs) == 2
    assert all(torch.equal(VAED4.from_pretrained(out).state_dict()[k], v) for k, v in decoder.state_dict().items())


@pytest.mark.slow
def test_a_failure_in_the_ranks_fails_the_launch(tmp_path, monkeypatch, capfd):
    """The ranks' exit status comes back through accelerate launch (torchrun)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(launch.LaunchError, match="on 2 CPU processes failed \\(exit status 1\\)") as info:
        launch.relaunch(["stage", STAGE, "--config", "missing.yaml"], 2, use_cpu=True)
    assert info.value.returncode == 1
    err = capfd.readouterr().err
    assert "config error: missing.yaml: config file not found" in err  # a rank's own error (status 2) ...
    assert "failed (exitcode: 2)" in err  # ... which torchrun reports, stopping the other rank
