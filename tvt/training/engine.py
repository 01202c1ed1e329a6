"""The training engine every stage plugs into: accelerate, resumable atomic checkpoints, tracking.

A stage builds its models on ``trainer.device`` after constructing the :class:`Trainer`
(which seeds every RNG first, so initialisations are reproducible), hands them with their
optimisers to :meth:`Trainer.register`, and calls :meth:`Trainer.fit` with a *step
function*. The step function computes its losses on one micro-batch and calls
:meth:`Trainer.optimise` once per optimiser, in the order the method needs (generator then
discriminator for a GAN; generator then fake score network for VSD). The engine owns what
every stage needs and nobody should rewrite:

* ``accelerate`` (device placement, mixed precision, gradient accumulation, ``accelerate
  launch`` for several GPUs — nothing cluster-specific here);
* **exact resumption**: the data order is a permutation keyed on (seed, epoch), the position
  is a pure function of the step, and ``accelerator.save_state`` stores weights, optimiser
  moments and every RNG, so a run killed at any point and restarted ends with the *same*
  weights as an uninterrupted one;
* **lean checkpoints**: only what training can change is stored — trainable parameters and
  buffers (BatchNorm statistics) — not the frozen weights a stage rebuilds from its inputs
  (at SD scale the frozen UNet that the ISR generator and fake score share would otherwise
  be written twice per checkpoint); see :func:`frozen_parameter_names`;
* **atomic checkpoints**: written to ``tmp-<step>``, fsynced, then renamed to
  ``checkpoint-<step>``; a half-written checkpoint is never picked up;
* a **non-finite guard**: a NaN/Inf loss or gradient norm stops the run with an error naming
  the step and the loss, before it can reach a checkpoint;
* a **learning-rate schedule** (:func:`lr_factor`: linear warm-up, then constant, cosine or
  linear decay) that is a pure function of the update number, so it needs no state of its
  own to resume exactly;
* tqdm progress, per-window metrics and image grids logged to the stage's MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME, GradientAccumulationPlugin, set_seed
from safetensors.torch import load_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from tvt.atomic import atomic_dir, fsync_dir, fsync_tree
from tvt.config import params_hash
from tvt.tracking import Terminated

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"

#: keys of a stage section that do not change the training trajectory: editing them
#: (e.g. training for more steps) resumes from existing checkpoints instead of discarding them
BOOKKEEPING_KEYS = frozenset(
    {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "num_workers"}
)

StepFn = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor | float]]
SampleFn = Callable[[], Mapping[str, torch.Tensor]]
LR_DECAYS = ("constant", "cosine", "linear")


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the last good checkpoint is left untouched."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint lacks trainable state of the models being trained (or holds foreign keys)."""


@dataclass(frozen=True)
class TrainConfig:
    """The engine's knobs, read from a stage's config section (other keys are the stage's own)."""

    steps: int
    batch_size: int
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    grad_clip: float | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0  # 0 = no image grids
    num_workers: int = 0
    lr_warmup: int = 0  # updates of linear warm-up from lr / lr_warmup to lr
    lr_decay: str = "constant"  # after warm-up: "constant" | "cosine" | "linear" (to 0 after the last update)

    def __post_init__(self):
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay {self.lr_decay!r} is not one of {LR_DECAYS}")
        if self.lr_warmup < 0:
            raise ValueError(f"lr_warmup must be >= 0, got {self.lr_warmup}")

    @classmethod
    def from_section(cls, section: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**section, **overrides}.items() if k in names})


def lr_factor(step: int, steps: int, warmup: int = 0, decay: str = "constant") -> float:
    """The multiplier of the base learning rate for update ``step`` (1-based) of ``steps``.

    Linear warm-up ``step / warmup`` over the first ``warmup`` updates (Goyal et al. 2017;
    the usual cure for Adam's large early steps), then ``constant`` 1, or a ``cosine``
    (Loshchilov & Hutter, SGDR) or ``linear`` decay that would reach 0 one update after the
    last, so no update is wasted at learning rate 0. A pure function of the step: resuming
    needs nothing but the step, which every checkpoint stores.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay {decay!r} is not one of {LR_DECAYS}")
    if warmup and step <= warmup:
        return step / warmup
    if decay == "constant":
        return 1.0
    progress = (step - warmup - 1) / max(steps - warmup, 1)  # 0 at the first decayed update
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch drawn from (seed, epoch) alone.

    Unlike ``RandomSampler`` it holds no generator state, so the order of any epoch can be
    rebuilt after a restart without replaying the epochs before it.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` folder (``tmp-*`` folders are ignored)."""
    if not ckpt_dir.is_dir():
        return None
    complete = [
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(complete)[1] if complete else None


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that no optimiser changes (``requires_grad`` off).

    A checkpoint leaves them out: the stage rebuilds them identically from its inputs, whose
    digest is in the trainer's fingerprint. Buffers are always kept (BatchNorm running
    statistics change in training without a gradient). Shared parameters appear under
    every name they have, as in ``state_dict``.
    """
    return {name for name, value in model.state_dict(keep_vars=True).items()
            if isinstance(value, nn.Parameter) and not value.requires_grad}


def model_state_file(index: int) -> str:
    """The file ``accelerator.save_state`` writes the ``index``-th prepared model to."""
    return f"{SAFE_MODEL_NAME}{f'_{index}' if index else ''}.safetensors"


def write_dir_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary folder that replaces ``out_dir`` only when complete
    (see :mod:`tvt.atomic`)."""
    with atomic_dir(out_dir) as tmp:
        write(tmp)


def forked_rng(device: torch.device | str):
    """Run a block on copies of the CPU (and, on GPU, that device's) RNG state, so that
    validating or previewing never shifts the training random stream."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.detach().float() + 1) / 2).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RGB PSNR (dB) of images in [-1, 1] — a training monitor, not the benchmark metric."""
    mse = (to_unit(pred) - to_unit(target)).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def mean_psnr(reconstruct: Callable[[Mapping[str, Any]], torch.Tensor], dataset: Dataset, *,
              batch_size: int, device: torch.device | str) -> float:
    """Mean PSNR of ``reconstruct(batch)`` against ``batch["hr"]`` over a dataset.

    Runs under :func:`forked_rng`.
    """
    values = []
    with forked_rng(device):
        for batch in DataLoader(dataset, batch_size=batch_size):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            values.append(psnr(reconstruct(batch), batch["hr"]).cpu())
    return float(torch.cat(values).mean())


def image_grid(panels: Mapping[str, torch.Tensor], *, title: str = "", max_images: int = 2,
               zoom: float = 0.25):
    """A figure with one column per panel (e.g. LR | SR | HR) and, under each image, a
    nearest-neighbour zoom of its centre (``zoom`` of the side), where fine structure shows.

    Panels are batches in [-1, 1] and may differ in size (LR is smaller): the zoom box is
    placed in relative coordinates, so it covers the same scene region in every panel.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = min(max_images, *(len(p) for p in panels.values()))
    fig = Figure(figsize=(2.4 * len(panels), 4.8 * n), layout="constrained")
    axes = fig.subplots(2 * n, len(panels), squeeze=False)
    lo, hi = 0.5 - zoom / 2, 0.5 + zoom / 2
    for col, (name, batch) in enumerate(panels.items()):
        images = to_unit(batch[:n]).permute(0, 2, 3, 1).cpu().numpy()
        for row, image in enumerate(images):
            h, w = image.shape[:2]
            top, left = int(lo * h), int(lo * w)
            bottom, right = max(top + 1, math.ceil(hi * h)), max(left + 1, math.ceil(hi * w))
            full, crop = axes[2 * row, col], axes[2 * row + 1, col]
            full.imshow(image, interpolation="nearest")
            full.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top,
                                     fill=False, edgecolor="red", linewidth=1))
            crop.imshow(image[top:bottom, left:right], interpolation="nearest")
            if row == 0:
                full.set_title(f"{name} ({w}×{h})", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


class Trainer:
    """Runs one training loop (one set of models and optimisers) for a stage.

    ``fingerprint`` is what defines the trajectory (seed and the stage's settings, without
    :data:`BOOKKEEPING_KEYS`): checkpoints written under another fingerprint belong to a
    different experiment and are discarded rather than resumed.
    """

    def __init__(self, config: TrainConfig, *, name: str, seed: int, ckpt_dir: Path, run=None,
                 fingerprint: Mapping[str, Any] | None = None):
        self.config = config
        self.name = name
        self.seed = seed
        self.ckpt_dir = Path(ckpt_dir)
        self.run = run
        trajectory = {k: v for k, v in (fingerprint or {}).items() if k not in BOOKKEEPING_KEYS}
        if config.lr_decay != "constant":  # a decay is a function of the total: steps shape the trajectory
            trajectory["steps"] = config.steps
        self.fingerprint = params_hash({"seed": seed, "train": trajectory})
        # an update is exactly `grad_accum` micro-batches, epoch boundaries included (the batch
        # stream runs across epochs), so accumulation must not re-synchronise at a loader's end
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.grad_accum, sync_with_dataloader=False),
        )
        # accelerate's documented hooks: what save_state writes and load_state reads per model
        self.accelerator.register_save_state_pre_hook(self._drop_frozen_weights)
        self.accelerator.register_load_state_pre_hook(self._load_trainable_weights)
        set_seed(seed)  # before the stage builds its models: identical initialisation everywhere
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.step = 0  # the update being computed (1-based) once fit() runs
        self.last_checkpoint: Path | None = None
        self._sigterm = False
        self.history: list[tuple[int, dict[str, float]]] = []

    # ---- setup -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def register(self, models: Mapping[str, nn.Module],
                 optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, nn.Module]:
        """Prepare models and optimisers with accelerate; return the (possibly wrapped) models.

        The trainable parameters and the buffers of everything registered are checkpointed
        and restored (frozen parameters are rebuilt by the stage); frozen helpers (a
        teacher, LPIPS) are not registered, only moved to :attr:`device` by the stage.
        """
        if self.models:
            raise RuntimeError(f"{self.name}: register() was already called")
        if self.config.gradient_checkpointing:
            for module in (m for model in models.values() for m in model.modules()):
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
        prepared = self.accelerator.prepare(*models.values(), *optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.models = dict(zip(models, prepared[: len(models)]))
        self.optimizers = dict(zip(optimizers, prepared[len(models):]))
        for optimizer in self.optimizers.values():  # the schedule's base (kept in the optimiser's state)
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        return dict(self.models)

    def unwrap(self, name: str) -> nn.Module:
        """The bare model (no DDP / compile wrappers), e.g. for ``save_pretrained``."""
        return self.accelerator.unwrap_model(self.models[name])

    # ---- inside a step -----------------------------------------------------------------

    def optimise(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and step optimiser ``name`` (on the last micro-batch of an accumulation).

        Raises :class:`NonFiniteLossError` before the update if the loss (or, outside fp16,
        whose scaler skips such steps itself, the gradient norm) is not finite.
        """
        self._check_finite(f"loss '{name}'", loss)
        optimizer = self.optimizers[name]
        factor = lr_factor(self.step, self.config.steps, self.config.lr_warmup, self.config.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.config.grad_clip:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = self.accelerator.clip_grad_norm_(params, self.config.grad_clip)
            if self.config.mixed_precision != "fp16":
                self._check_finite(f"gradient norm of '{name}'", norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        bad = (~torch.isfinite(value.detach())).any().float()
        if self.accelerator.num_processes > 1:  # every process must stop, or the others hang
            bad = self.accelerator.reduce(bad, "max")
        if bad:
            kept = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"{self.name}: non-finite {what} at step {self.step}: {value.detach().float().tolist()}; "
                f"training stopped, last good checkpoint: {kept}"
            )

    # ---- the loop ----------------------------------------------------------------------

    def fit(self, dataset: Dataset, step_fn: StepFn, sample_fn: SampleFn | None = None) -> dict[str, float]:
        """Train to ``config.steps`` updates, resuming from the newest checkpoint if any.

        Returns the metrics of the last logging window (empty if nothing was left to train).
        """
        cfg = self.config
        if not self.models:
            raise RuntimeError(f"{self.name}: call register() before fit()")
        sampler = EpochShuffleSampler(len(dataset), self.seed)
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            # a private generator: creating a loader iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        ))
        if len(loader) == 0:
            raise ValueError(
                f"{self.name}: {len(dataset)} training samples make no full batch of {cfg.batch_size} "
                f"(x {self.accelerator.num_processes} processes); lower batch_size or add data"
            )
        start = self._resume()
        acc = self.accelerator
        log.info("%s: process %d of %d on %s, %d batches of %d per epoch and process, from step %d of %d",
                 self.name, acc.process_index, acc.num_processes, self.device, len(loader), cfg.batch_size,
                 start, cfg.steps)
        progress = tqdm(total=cfg.steps, initial=start, desc=self.name, dynamic_ncols=True,
                        disable=not self.is_main_process)
        # closing the stream ends its loader iteration, which unregisters it from accelerate
        with contextlib.closing(self._batch_stream(loader, sampler, start)) as batches, progress, \
                self._checkpoint_on_sigterm():
            last_metrics = self._train(batches, start, step_fn, sample_fn, progress)
        self.accelerator.wait_for_everyone()
        return last_metrics

    def _train(self, batches: Iterator, start: int, step_fn: StepFn, sample_fn: SampleFn | None,
               progress) -> dict[str, float]:
        cfg = self.config
        window: dict[str, tuple[torch.Tensor, int]] = {}  # key -> (sum, number of micro-batches)
        window_steps, window_start, window_cpu, last_metrics = 0, time.perf_counter(), time.process_time(), {}
        for self.step in range(start + 1, cfg.steps + 1):
            for _ in range(cfg.grad_accum):
                with self.accelerator.accumulate(*self.models.values()):
                    metrics = step_fn(next(batches))
                for key, value in metrics.items():  # a term may be absent (the GAN before disc_start)
                    total, count = window.get(key, (0, 0))
                    window[key] = (total + torch.as_tensor(value).detach().float(), count + 1)
            window_steps += 1
            progress.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                last_metrics = self._log_window(window, window_steps, elapsed, time.process_time() - window_cpu)
                progress.set_postfix({k: f"{v:.4g}" for k, v in last_metrics.items() if "/" not in k})
                window, window_steps, window_start, window_cpu = {}, 0, time.perf_counter(), time.process_time()
            if sample_fn is not None and cfg.sample_every and self.step % cfg.sample_every == 0:
                self._log_samples(sample_fn)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self._save_checkpoint(self.step)
            if self._stop_requested():
                self._save_checkpoint(self.step)
                log.warning("%s: SIGTERM received; stopped after step %d with a checkpoint (%s), a rerun resumes "
                            "there", self.name, self.step, self.last_checkpoint)
                raise Terminated(128 + signal.SIGTERM)
        return last_metrics

    @contextlib.contextmanager
    def _checkpoint_on_sigterm(self) -> Iterator[None]:
        """While training, SIGTERM (SLURM's time limit, ``scancel``, preemption: SIGKILL follows
        after ``KillWait``, 30 s by default) only raises a flag; the loop finishes the update in
        flight, checkpoints it and stops, so a requeued job loses no step. The update is never
        cut in half: resuming then equals an uninterrupted run."""
        self._sigterm = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(_signum, _frame):
            self._sigterm = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _stop_requested(self) -> bool:
        """Whether any process got SIGTERM (all must stop at the same step, or the others hang)."""
        flag = torch.tensor(float(self._sigterm), device=self.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, "max")
        return bool(flag)

    def _batch_stream(self, loader, sampler: EpochShuffleSampler, completed_steps: int) -> Iterator:
        """Endless batches, starting where ``completed_steps`` updates left off."""
        epoch, skip = divmod(completed_steps * self.config.grad_accum, len(loader))
        while True:
            epoch_loader = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            epoch_loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            # an online-degradation dataset draws from (seed, epoch, index): set before the loader's
            # iterator (and its worker processes) are created, which `yield from` does next
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            yield from epoch_loader
            epoch, skip = epoch + 1, 0

    def _log_window(self, window: Mapping[str, tuple[torch.Tensor, int]], steps: int,
                    elapsed: float, cpu_seconds: float = 0.0) -> dict[str, float]:
        """Window means of the step metrics, the learning rates, throughput and this process's CPU
        seconds per update (all threads; on a shared machine the cost that wall time hides)."""
        metrics = {k: float(total) / count for k, (total, count) in window.items()}
        metrics.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()})
        samples = steps * self.config.batch_size * self.config.grad_accum * self.accelerator.num_processes
        metrics["samples_per_s"] = samples / max(elapsed, 1e-9)
        metrics["cpu_s_per_step"] = cpu_seconds / max(steps, 1)
        self.history.append((self.step, metrics))
        if self.run is not None and self.is_main_process:
            self.run.log_metrics({f"{self.name}/{k}": v for k, v in metrics.items()}, step=self.step)
        return metrics

    def _log_samples(self, sample_fn: SampleFn) -> None:
        if not self.is_main_process or self.run is None:
            return
        for model in self.models.values():
            model.eval()
        try:
            with torch.no_grad(), forked_rng(self.device), self.accelerator.autocast():
                panels = sample_fn()
        finally:
            for model in self.models.values():
                model.train()
        fig = image_grid(panels, title=f"{self.name}, step {self.step}")
        self.run.log_figure(fig, f"{self.name}/samples/step_{self.step:06d}.png")

    # ---- checkpoints -------------------------------------------------------------------

    def _resume(self) -> int:
        """Restore the newest complete checkpoint; return the number of completed updates."""
        if self.is_main_process and self.ckpt_dir.is_dir():
            for stale in self.ckpt_dir.glob("tmp-*"):  # left by a killed run, never resumed from
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            return 0
        state = json.loads((ckpt / STATE_FILE).read_text())
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s: checkpoints in %s come from other settings (fingerprint %s != %s); "
                        "discarding them and starting afresh", self.name, self.ckpt_dir,
                        state.get("fingerprint"), self.fingerprint)
            self.accelerator.wait_for_everyone()
            if self.is_main_process:
                for old in self.ckpt_dir.glob("checkpoint-*"):
                    shutil.rmtree(old)
            self.accelerator.wait_for_everyone()
            return 0
        self.accelerator.load_state(str(ckpt))
        self.last_checkpoint = ckpt
        log.info("%s: resumed from %s (step %d)", self.name, ckpt, state["step"])
        if state["step"] > self.config.steps:
            log.warning("%s: the newest checkpoint (step %d) is past steps=%d; its weights are used as they are",
                        self.name, state["step"], self.config.steps)
        return int(state["step"])

    @staticmethod
    def _drop_frozen_weights(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        """Save hook: keep only trainable parameters and buffers in each model's state dict."""
        for model, state in zip(models, weights):
            for name in frozen_parameter_names(model) & state.keys():
                del state[name]

    def _load_trainable_weights(self, models: list[nn.Module], input_dir: str) -> None:
        """Load hook: restore each model from its lean state, checking that only frozen
        parameters are absent; then empty ``models`` so that accelerate loads none of them
        again (strictly, which a lean state would fail)."""
        device = str(self.device) if self.device.type != "cpu" else "cpu"
        for index, model in enumerate(models):
            path = Path(input_dir) / model_state_file(index)
            missing, unexpected = load_model(model, path, strict=False, device=device)
            lacking = sorted(set(missing) - frozen_parameter_names(model))
            if lacking or unexpected:
                raise CheckpointMismatchError(
                    f"{self.name}: {path} does not match the models being trained "
                    f"(trainable state missing: {lacking[:5]}{' ...' if len(lacking) > 5 else ''}; "
                    f"unknown keys: {sorted(unexpected)[:5]}); the code changed what is trainable "
                    f"since it was written: delete {self.ckpt_dir} to start afresh"
                )
        models.clear()

    def _save_checkpoint(self, step: int) -> None:
        final = self.ckpt_dir / f"checkpoint-{step}"
        if final.exists():  # resumed exactly at the end: nothing new to save
            self.last_checkpoint = final
            return
        tmp = self.ckpt_dir / f"tmp-{step}"
        if self.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))  # every process writes its own RNG state
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint, "stage": self.name}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            fsync_tree(tmp)
            os.rename(tmp, final)
            fsync_dir(self.ckpt_dir)
            self._prune_checkpoints()
        self.last_checkpoint = final
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        steps = sorted(int(m.group(1)) for p in self.ckpt_dir.iterdir()
                       if (m := CHECKPOINT_PATTERN.match(p.name)))
        for old in steps[: max(len(steps) - self.config.keep_checkpoints, 0)]:
            shutil.rmtree(self.ckpt_dir / f"checkpoint-{old}")

    # ---- output ------------------------------------------------------------------------

    def publish(self, out_dir: Path, write: Callable[[Path], None]) -> None:
        """Write the stage's final output atomically (main process only; see :func:`write_dir_atomically`)."""
        self.accelerator.wait_for_everyone()
        if self.is_main_process:
            write_dir_atomically(Path(out_dir), write)
        self.accelerator.wait_for_everyone()


class Call(nn.Module):
    """A module whose ``forward`` is ``fn(model, *args)``.

    Under DDP, gradients are synchronised only for computations entered through the
    wrapper's ``forward``. A stage whose trainable graph is not its model's own forward
    (decode a given latent; encode, sample and decode while keeping the posterior for the
    KL term) registers a ``Call`` of that graph instead of the bare model.
    """

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.model, *args, **kwargs)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients into ``modules`` (e.g. the discriminator during the generator pass).

    Restores each parameter's own ``requires_grad`` afterwards. Under DDP, call the
    *unwrapped* module inside (``trainer.unwrap``): a wrapped forward whose parameters
    receive no gradient leaves DDP waiting for them.
    """
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def files_digest(*paths: Path) -> str:
    """sha256 over the names and bytes of files (folders recursively, in sorted order).

    Goes into a trainer's fingerprint for the inputs a stage trains on (the pairs table,
    which lists every image's digest; an upstream model's weights), so checkpoints made
    from other inputs are never resumed.
    """
    digest = hashlib.sha256()
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
