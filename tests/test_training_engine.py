"""The training engine: exact resumption, atomic checkpoints, NaN guard, logging."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset
from training_support import RecordingRun, one_thread  # noqa: F401

from tvt.training.engine import (
    STATE_FILE,
    CheckpointMismatchError,
    EpochShuffleSampler,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    frozen,
    frozen_parameter_names,
    image_grid,
    latest_checkpoint,
    lr_factor,
    mean_psnr,
    psnr,
    write_dir_atomically,
)

SEED = 7


class ToyPairs(Dataset):
    """10 fixed (input, target) pairs of a noisy linear map, plus the index (to audit the order)."""

    def __init__(self, n: int = 10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.randn(4, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": i}


def make_trainer(tmp_path, run=None, *, lr=0.05, **overrides):
    cfg = TrainConfig.from_section({"steps": 6, "batch_size": 3, "grad_accum": 2, "checkpoint_every": 2,
                                    "keep_checkpoints": 2, "log_every": 2, "lr": lr, **overrides})
    trainer = Trainer(cfg, name="toy", seed=SEED, ckpt_dir=tmp_path / "ckpt", run=run,
                      fingerprint={"lr": lr, **overrides})
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))  # dropout: uses the RNG
    critic = nn.Linear(2, 1)
    trainer.register({"model": model, "critic": critic},
                     {"model": torch.optim.Adam(model.parameters(), lr=lr),
                      "critic": torch.optim.SGD(critic.parameters(), lr=0.01)})
    return trainer


def toy_step(trainer, fail_at=None, nan_at=None):
    """Two optimisers, like a GAN: the model's loss goes through a frozen critic, then the critic trains."""
    model, critic = trainer.models["model"], trainer.models["critic"]

    def step(batch):
        if trainer.step == fail_at:
            raise KeyboardInterrupt("simulated kill")
        pred = model(batch["x"] + 0.01 * torch.randn_like(batch["x"]))
        with frozen(critic):
            loss = nn.functional.mse_loss(pred, batch["y"]) + 0.01 * trainer.unwrap("critic")(pred).mean()
        if trainer.step == nan_at:
            loss = loss * float("nan")
        trainer.optimise("model", loss)
        critic_loss = critic(pred.detach()).pow(2).mean()
        trainer.optimise("critic", critic_loss)
        return {"loss": loss, "critic": critic_loss}

    return step


def weights(trainer):
    return {f"{name}.{k}": v.clone() for name in trainer.models for k, v in trainer.unwrap(name).state_dict().items()}


def test_loss_falls_and_metrics_are_logged(tmp_path):
    run = RecordingRun()
    trainer = make_trainer(tmp_path, run, steps=20, log_every=5, checkpoint_every=10)
    trainer.fit(ToyPairs(), toy_step(trainer))
    losses = [m["loss"] for _, m in trainer.history]
    assert losses[-1] < 0.5 * losses[0], losses
    steps = [s for s, _ in run.metrics]
    assert steps == [5, 10, 15, 20]
    logged = run.metrics[-1][1]
    assert {"toy/loss", "toy/critic", "toy/lr/model", "toy/lr/critic", "toy/samples_per_s",
            "toy/cpu_s_per_step"} <= set(logged)
    assert logged["toy/lr/model"] == pytest.approx(0.05)
    assert logged["toy/samples_per_s"] > 0 and logged["toy/cpu_s_per_step"] > 0


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision is fixed by the first
    Accelerator (a stage is a process of its own; this test process is not): reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_runs_the_forward_in_bf16_and_keeps_fp32_weights(tmp_path, fresh_accelerator_state):
    """`mixed_precision: bf16` (the CPU-capable half precision; fp16 needs CUDA): accelerate's
    autocast covers the registered model's forward, the master weights stay float32, and it trains."""
    trainer = make_trainer(tmp_path, steps=20, log_every=5, checkpoint_every=10, mixed_precision="bf16")
    dtypes = []  # of the first layer's output (accelerate casts the model's *outputs* back to float32)
    trainer.unwrap("model")[0].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    trainer.fit(ToyPairs(), toy_step(trainer))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert {p.dtype for p in trainer.unwrap("model").parameters()} == {torch.float32}
    losses = [m["loss"] for _, m in trainer.history]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_resumed_run_ends_with_identical_weights(tmp_path):
    reference = make_trainer(tmp_path / "a")
    reference.fit(ToyPairs(), toy_step(reference))

    interrupted = make_trainer(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):  # killed during step 5, after checkpoint-4
        interrupted.fit(ToyPairs(), toy_step(interrupted, fail_at=5))
    assert latest_checkpoint(tmp_path / "b" / "ckpt").name == "checkpoint-4"
    torch.randn(100)  # the crashed process's RNG moved on; the resume must not care

    resumed = make_trainer(tmp_path / "b")
    resumed.fit(ToyPairs(), toy_step(resumed))
    ref, res = weights(reference), weights(resumed)
    assert ref.keys() == res.keys()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key
    # and the interrupted run really had diverged from the reference before resuming
    assert not all(torch.equal(ref[k], v) for k, v in weights(interrupted).items())


def test_lr_factor_warms_up_then_decays_to_zero_one_update_after_the_last():
    assert [lr_factor(s, 10, warmup=4) for s in range(1, 11)] == [0.25, 0.5, 0.75] + [1.0] * 7
    # decays start at 1 on the first update after warm-up and end above 0 on the last
    assert lr_factor(5, 10, 4, "cosine") == 1.0 and lr_factor(5, 10, 4, "linear") == 1.0
    assert lr_factor(10, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_factor(10, 10, 4, "linear") == pytest.approx(1 / 6)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.75)  # half way through the decay: 0.5 (1 + cos π/3)
    cosine = [lr_factor(s, 100, 0, "cosine") for s in range(1, 101)]
    assert all(a > b for a, b in itertools.pairwise(cosine)) and cosine[-1] > 0
    with pytest.raises(ValueError, match="'step' is not one of"):
        lr_factor(1, 10, 0, "step")
    with pytest.raises(ValueError, match="lr_decay 'exp'"):
        TrainConfig(steps=1, batch_size=1, lr_decay="exp")


def test_scheduled_lr_is_applied_logged_and_resumed_exactly(tmp_path):
    schedule = {"lr_warmup": 2, "lr_decay": "cosine"}
    run = RecordingRun()
    reference = make_trainer(tmp_path / "a", run, **schedule)
    reference.fit(ToyPairs(), toy_step(reference))
    # every optimiser follows the schedule from its own base rate (logged after each window's last update)
    assert [step for step, _ in run.metrics] == [2, 4, 6]
    for step, logged in run.metrics:
        assert logged["toy/lr/model"] == pytest.approx(0.05 * lr_factor(step, 6, 2, "cosine"))
        assert logged["toy/lr/critic"] == pytest.approx(0.01 * lr_factor(step, 6, 2, "cosine"))
    constant = make_trainer(tmp_path / "c")
    constant.fit(ToyPairs(), toy_step(constant))
    assert not all(torch.equal(a, b) for a, b in zip(weights(reference).values(), weights(constant).values()))

    interrupted = make_trainer(tmp_path / "b", **schedule)
    with pytest.raises(KeyboardInterrupt):  # killed during step 5, after checkpoint-4
        interrupted.fit(ToyPairs(), toy_step(interrupted, fail_at=5))
    resumed = make_trainer(tmp_path / "b", **schedule)
    resumed.fit(ToyPairs(), toy_step(resumed))
    assert resumed.history[0][0] == 6  # only steps 5-6 were trained
    ref, res = weights(reference), weights(resumed)
    for key in ref:
        assert torch.equal(ref[key], res[key]), key


def test_a_decaying_schedule_makes_steps_part_of_the_trajectory(tmp_path):
    """With a decay the rate at step 4 depends on the total, so more steps cannot resume (constant can:
    test_tmp_checkpoints_are_never_resumed_and_old_ones_pruned)."""
    first = make_trainer(tmp_path, lr_decay="linear")
    first.fit(ToyPairs(), toy_step(first))
    longer = make_trainer(tmp_path, steps=8, lr_decay="linear")
    longer.fit(ToyPairs(), toy_step(longer))
    assert [s for s, _ in longer.history] == [2, 4, 6, 8]  # trained from scratch


def test_batch_stream_resumes_mid_epoch(tmp_path):
    trainer = make_trainer(tmp_path)
    sampler = EpochShuffleSampler(10, SEED)
    loader = trainer.accelerator.prepare(torch.utils.data.DataLoader(
        ToyPairs(), batch_size=3, sampler=sampler, drop_last=True))
    def order(start_step, n):
        stream = trainer._batch_stream(loader, sampler, start_step)
        return [next(stream)["index"].tolist() for _ in range(n)]
    full = order(0, 12)  # 4 epochs of 3 batches
    assert order(4, 4) == full[8:]  # step 4 x grad_accum 2 = batch 8: epoch 2, third batch
    first_epoch = [i for batch in full[:3] for i in batch]
    assert len(set(first_epoch)) == 9  # no repeats within an epoch (10 samples, last batch dropped)
    assert full[:3] != full[3:6]  # a new permutation each epoch


def test_tmp_checkpoints_are_never_resumed_and_old_ones_pruned(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.fit(ToyPairs(), toy_step(trainer))
    ckpt_dir = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # keep 2
    state = json.loads((ckpt_dir / "checkpoint-6" / STATE_FILE).read_text())
    assert state["step"] == 6
    # a half-written save (killed before the rename) and a folder without state file
    (ckpt_dir / "tmp-8").mkdir()
    (ckpt_dir / "tmp-8" / STATE_FILE).write_text(json.dumps({"step": 8, "fingerprint": state["fingerprint"]}))
    (ckpt_dir / "checkpoint-9").mkdir()
    assert latest_checkpoint(ckpt_dir).name == "checkpoint-6"
    again = make_trainer(tmp_path, steps=8)  # more steps: resumes from 6
    again.fit(ToyPairs(), toy_step(again))
    assert not (ckpt_dir / "tmp-8").exists()  # the stale temp folder was cleared
    assert (ckpt_dir / "checkpoint-8").is_dir()
    assert again.history[0][0] == 8  # only steps 7-8 were trained


def test_changed_settings_discard_old_checkpoints(tmp_path):
    first = make_trainer(tmp_path, lr=0.05)
    first.fit(ToyPairs(), toy_step(first))
    other = make_trainer(tmp_path, lr=0.01)
    other.fit(ToyPairs(), toy_step(other))
    assert [s for s, _ in other.history] == [2, 4, 6]  # trained from scratch


def test_nan_guard_names_step_and_loss_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    ckpt = tmp_path / "ckpt" / "checkpoint-4"

    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(ToyPairs(), toy_step(trainer, nan_at=5))
    message = str(info.value)
    assert "step 5" in message and "loss 'model'" in message and "nan" in message
    assert str(ckpt) in message
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()}
    assert latest_checkpoint(tmp_path / "ckpt") == ckpt
    assert not (tmp_path / "ckpt" / "checkpoint-6").exists()
    # resuming from the surviving checkpoint works and leaves it intact
    resumed = make_trainer(tmp_path)
    resumed.fit(ToyPairs(), toy_step(resumed))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.iterdir()} == digest


class FrozenTrunk(nn.Module):
    """A big frozen trunk (like SD's UNet) under a small trainable head with BatchNorm."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width)).requires_grad_(False)
        self.head = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 2))

    def forward(self, x):
        return self.head(self.trunk(x))


def make_lean_trainer(tmp_path, *, steps=4, trainable_trunk_bias=False):
    cfg = TrainConfig.from_section({"steps": steps, "batch_size": 3, "checkpoint_every": 2, "log_every": 2})
    trainer = Trainer(cfg, name="lean", seed=SEED, ckpt_dir=tmp_path / "ckpt", fingerprint={})
    model = FrozenTrunk()
    if trainable_trunk_bias:  # the code changed what trains: the old checkpoint lacks this tensor
        model.trunk[2].bias.requires_grad_(True)
    trainer.register({"model": model},
                     {"model": torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)})
    return trainer


def lean_step(trainer):
    def step(batch):
        loss = nn.functional.mse_loss(trainer.models["model"](batch["x"]), batch["y"])
        trainer.optimise("model", loss)
        return {"loss": loss}

    return step


def test_checkpoints_hold_only_trainable_state_and_restore_it_exactly(tmp_path):
    trainer = make_lean_trainer(tmp_path)
    trainer.fit(ToyPairs(), lean_step(trainer))
    model = trainer.unwrap("model")
    ckpt = tmp_path / "ckpt" / "checkpoint-4"
    stored = load_file(ckpt / "model.safetensors")
    frozen_names = {"trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"}
    assert frozen_parameter_names(model) == frozen_names
    assert set(stored) == set(model.state_dict()) - frozen_names  # head parameters + BatchNorm buffers
    assert int(stored["head.0.num_batches_tracked"]) == 4  # buffers that changed are kept
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert (ckpt / "model.safetensors").stat().st_size < 0.05 * full  # the trunk is ~99 % of the weights

    resumed = make_lean_trainer(tmp_path)
    with torch.no_grad():  # garbage in the trainable state: the checkpoint must overwrite all of it
        for value in resumed.unwrap("model").head.state_dict().values():
            value.copy_(torch.full_like(value, 3))
    resumed.fit(ToyPairs(), lean_step(resumed))
    assert resumed.history == []  # resumed at step 4 of 4: nothing trained on top
    restored = resumed.unwrap("model").state_dict()
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())  # frozen ones: rebuilt
    before, after = trainer.optimizers["model"].state_dict(), resumed.optimizers["model"].state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, moments in before["state"].items():
        assert all(torch.equal(moments[k], after["state"][index][k]) for k in moments), index


def test_a_checkpoint_lacking_trainable_state_is_refused(tmp_path):
    trainer = make_lean_trainer(tmp_path, steps=2)
    trainer.fit(ToyPairs(), lean_step(trainer))
    changed = make_lean_trainer(tmp_path, steps=2, trainable_trunk_bias=True)
    with pytest.raises(CheckpointMismatchError, match=r"trainable state missing: \['trunk.2.bias'\].*delete"):
        changed.fit(ToyPairs(), lean_step(changed))


def test_too_small_dataset_is_named(tmp_path):
    trainer = make_trainer(tmp_path, batch_size=11)
    with pytest.raises(ValueError, match="10 training samples make no full batch of 11"):
        trainer.fit(ToyPairs(), toy_step(trainer))


def test_sample_grids_are_logged_without_touching_the_training_rng(tmp_path):
    run = RecordingRun()
    trainer = make_trainer(tmp_path, run, sample_every=3)
    def sample():
        noise = torch.randn(2, 3, 8, 8)  # would shift the RNG if not forked
        return {"LR": noise[:, :, :4, :4], "SR": noise, "HR": noise}
    trainer.fit(ToyPairs(), toy_step(trainer), sample_fn=sample)
    assert run.figures == ["toy/samples/step_000003.png", "toy/samples/step_000006.png"]
    plain = make_trainer(tmp_path / "plain")
    plain.fit(ToyPairs(), toy_step(plain))
    for key, value in weights(plain).items():
        assert torch.equal(value, weights(trainer)[key]), key


def test_image_grid_layout():
    fig = image_grid({"LR": torch.zeros(3, 3, 8, 8), "SR": torch.ones(3, 3, 32, 32)}, max_images=2)
    assert len(fig.axes) == 2 * 2 * 2  # (full + zoom) rows x 2 images, 2 columns
    zoom = fig.axes[2].images[0].get_array()  # row 1, column 0: the zoom of LR image 0
    assert zoom.shape[:2] == (2, 2)  # a quarter of the 8-pixel side


def test_psnr_values():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.2  # [-1,1] offset 0.2 -> 0.1 in [0,1] -> MSE 0.01 -> 20 dB
    assert psnr(b, a)[1].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, a)[0].item() == pytest.approx(100.0)  # clamped, finite
    data = [{"hr": b[1]}] * 3
    assert mean_psnr(lambda batch: batch["hr"] - 0.2, data, batch_size=2, device="cpu") == pytest.approx(20.0, abs=1e-4)


def test_write_dir_atomically(tmp_path):
    out = tmp_path / "model"
    write_dir_atomically(out, lambda d: (d / "w.txt").write_text("v1"))
    assert (out / "w.txt").read_text() == "v1"

    def crash(d):
        (d / "w.txt").write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        write_dir_atomically(out, crash)
    assert (out / "w.txt").read_text() == "v1"  # the published output is never half-written
    write_dir_atomically(out, lambda d: (d / "w.txt").write_text("v2"))
    assert (out / "w.txt").read_text() == "v2"
    assert not (tmp_path / "model.tmp").exists()


_KILLABLE_RUN = """
import logging, sys, time, torch
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_training_engine import ToyPairs, make_trainer, toy_step, weights
torch.set_num_threads(1)
trainer = make_trainer(Path({root!r}), steps=24, checkpoint_every={every}, keep_checkpoints=2)
step = toy_step(trainer)
progress = Path({root!r}) / "progress"
def slow_step(batch):
    time.sleep(0.05)  # long enough for the parent to kill us between checkpoints
    progress.write_text(str(trainer.step))
    return step(batch)
trainer.fit(ToyPairs(), slow_step)
torch.save(weights(trainer), {out!r})
"""


def _killable(tmp_path, root: str, out: str, every: int = 2):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / root).mkdir(parents=True, exist_ok=True)
    script = _KILLABLE_RUN.format(tests=str(Path(__file__).parent), root=str(tmp_path / root), out=str(tmp_path / out),
                                  every=every)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_weights(tmp_path):
    """A real SIGKILL at an arbitrary moment after some checkpoints: the rerun resumes from
    the newest complete checkpoint and ends bit-identical to an uninterrupted run."""
    import os
    import signal
    import time

    reference = _killable(tmp_path, "ref", "ref.pt")
    victim = _killable(tmp_path, "victim", "victim.pt")
    ckpt = tmp_path / "victim" / "ckpt"
    deadline = time.monotonic() + 300  # a loaded machine needs minutes to import torch in the child
    while latest_checkpoint(ckpt) is None or int(latest_checkpoint(ckpt).name.split("-")[1]) < 6:
        assert victim.poll() is None, f"finished before it could be killed: {victim.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint-6 within 120 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = int(latest_checkpoint(ckpt).name.split("-")[1])
    assert 6 <= killed_at < 24 and not (tmp_path / "victim.pt").exists()

    rerun = _killable(tmp_path, "victim", "victim.pt")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert f"resumed from {ckpt / f'checkpoint-{killed_at}'} (step {killed_at})" in rerun.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    res = torch.load(tmp_path / "victim.pt", weights_only=True)
    assert ref.keys() == res.keys()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resumes_identically(tmp_path):
    """SIGTERM (a SLURM time limit) between two periodic checkpoints: the update in flight is
    finished and checkpointed, the process exits 143, and the rerun ends bit-identical to an
    uninterrupted run. With checkpoint_every=100 no periodic checkpoint exists before step 24."""
    import os
    import signal
    import time

    reference = _killable(tmp_path, "ref", "ref.pt", every=100)
    victim = _killable(tmp_path, "victim", "victim.pt", every=100)
    progress = tmp_path / "victim" / "progress"
    deadline = time.monotonic() + 300  # a loaded machine needs minutes to import torch in the child
    while not progress.exists() or int(progress.read_text() or 0) < 5:
        assert victim.poll() is None, f"finished before it could be stopped: {victim.stderr.read()}"
        assert time.monotonic() < deadline, "training did not reach step 5 within 300 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGTERM)
    assert victim.wait(timeout=60) == 143, victim.stderr.read()
    assert "SIGTERM received; stopped after step" in victim.stderr.read()
    saved = int(latest_checkpoint(tmp_path / "victim" / "ckpt").name.split("-")[1])
    assert 5 <= saved < 24 and not (tmp_path / "victim.pt").exists()

    rerun = _killable(tmp_path, "victim", "victim.pt", every=100)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert f"(step {saved})" in rerun.stderr.read()
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    res = torch.load(tmp_path / "victim.pt", weights_only=True)
    for key in ref:
        assert torch.equal(ref[key], res[key]), key
