"""Stage execution: what ``tvt stage NAME`` does, for Snakemake and DVC alike.

Each stage reads its own config section, opens its MLflow run (nested under the
pipeline run when there is one) and writes its outputs atomically: into ``<out>.tmp``
first, renamed into place only when the stage succeeded, so a killed or failed stage
never leaves a half-written output that a later run could mistake for a finished one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tvt import config as config_mod
from tvt import launch, tracking
from tvt import stages as stages_mod
from tvt.atomic import atomic_dir

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run (missing input, unsupported mode); the message says why."""


def _require(path: str | Path, produced_by: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} is missing: run the '{produced_by}' stage first "
                         f"(e.g. `snakemake --cores 2 {produced_by}`)")
    return path


def _stage_data(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    data = cfg["data"]
    with atomic_dir(stages_mod.DATA_DIR) as out:
        if data["source"] == "mini":
            from tvt.data.mini import build_mini_dataset

            manifest = build_mini_dataset(data, out, cfg["seed"])
        else:
            from tvt.data.paper import assemble_paper_dataset

            manifest = assemble_paper_dataset(data, out, Path(stages_mod.DATASETS_DIR))
        from tvt.data.manifest import read_manifest

        rows = read_manifest(manifest)
        real_pairs = out / "real_pairs.csv"  # paper mode's real LR/HR test sets, scored as they are
        if real_pairs.is_file():
            run.log_metrics({"n_real_pairs": len(read_manifest(real_pairs))})
            run.log_artifact(real_pairs)
        counts: dict[str, int] = {}
        for row in rows:
            key = f"n_{row['kind']}_{row['split']}"
            counts[key] = counts.get(key, 0) + 1
        run.log_metrics({"n_images": len(rows), **counts})
        run.log_artifact(manifest)


def _stage_download(name: str):
    def handler(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
        from tvt.data.download import fetch_dataset

        spec = cfg["data"]["datasets"][name]
        target = fetch_dataset(name, spec, Path(stages_mod.DATASETS_DIR),
                               trust_new_hashes=opts.get("trust_new_hashes", False))
        run.log_artifact(target / ".complete", "download")

    return handler


def _stage_degrade(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.data.manifest import read_manifest
    from tvt.degradation import synthesize_pairs

    manifest = _require(Path(stages_mod.DATA_DIR) / "manifest.csv", "data")
    deg = cfg["degrade"]
    with atomic_dir(stages_mod.PAIRS_DIR) as out:
        pairs = synthesize_pairs(manifest, out, deg, cfg["seed"], workers=deg["workers"])
        rows = read_manifest(pairs)
        run.log_metrics({"n_pairs": len(rows)})
        run.log_artifact(pairs)


def _stage_prior(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    if cfg["prior"]["source"] == "hub":
        from tvt.models.sd_weights import fetch_sd_base

        with atomic_dir(stages_mod.SD_DIR) as out:
            fetch_sd_base(cfg["prior"], out)
        return
    from tvt.training.prior import run_prior

    run_prior(cfg, Path(stages_mod.PAIRS_DIR), Path(stages_mod.SD_DIR), _ckpt_dir("prior"), run)


def _stage_decoder_transfer(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.training.vae_transfer import run_decoder_transfer

    run_decoder_transfer(cfg, Path(stages_mod.PAIRS_DIR), Path(stages_mod.SD_DIR),
                         Path(stages_mod.VAE_D4_DECODER_DIR), _ckpt_dir("decoder_transfer"), run)


def _stage_encoder_transfer(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.training.vae_transfer import run_encoder_transfer

    run_encoder_transfer(cfg, Path(stages_mod.PAIRS_DIR), Path(stages_mod.VAE_D4_DECODER_DIR),
                         Path(stages_mod.VAE_D4_DIR), _ckpt_dir("encoder_transfer"), run)


def _stage_isr(name: str):
    def handler(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
        from tvt.training.isr import run_isr

        tvt = cfg["isr"][name]["method"] == "tvt"
        run_isr(cfg, name, Path(stages_mod.PAIRS_DIR), Path(stages_mod.SD_DIR),
                Path(stages_mod.VAE_D4_DIR) if tvt else None, Path(stages_mod.method_model_dir(name)),
                _ckpt_dir(f"isr_{name}"), run)

    return handler


def _stage_stablesr_sft(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.training.stablesr_sft import run_stablesr_sft

    run_stablesr_sft(cfg, Path(stages_mod.PAIRS_DIR), Path(stages_mod.SD_DIR), Path(stages_mod.STABLESR_SFT_DIR),
                     _ckpt_dir("stablesr_sft"), run)


def _stage_stablesr_cfw(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.training.stablesr_cfw import run_stablesr_stage_b

    run_stablesr_stage_b(cfg, Path(stages_mod.PAIRS_DIR), Path(stages_mod.SD_DIR), Path(stages_mod.STABLESR_SFT_DIR),
                         Path(stages_mod.method_model_dir("stablesr")), _ckpt_dir("stablesr_cfw"), run)


def _ckpt_dir(stage: str) -> Path:
    """Checkpoints live outside the stage's output, so a rerun can resume from them
    (Snakemake and DVC delete a stage's outputs before running it)."""
    return Path(stages_mod.CKPT_DIR) / stage


def _stage_complexity(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.complexity import compute_complexity, to_json, to_markdown

    rows = compute_complexity(output_size=512)  # the paper's setting: x4 to 512², SD 2.1-base scale
    out = Path(stages_mod.COMPLEXITY_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(to_json(rows) + "\n")
    os.replace(tmp, out)
    run.log_text(to_markdown(rows), "complexity.md")
    run.log_artifact(out)


def _stage_evaluate(cfg: Mapping, run: tracking.StageRun, opts: Mapping) -> None:
    from tvt.evaluate import evaluate

    pairs = _require(Path(stages_mod.PAIRS_DIR) / "pairs.csv", "degrade")
    with atomic_dir(stages_mod.TABLES_DIR) as tables:
        evaluate(cfg, pairs, tables, Path(stages_mod.METRICS_FILE), run, data_dir=Path(stages_mod.DATA_DIR))


HANDLERS: dict[str, Callable[[Mapping, tracking.StageRun, Mapping], None]] = {
    "data": _stage_data,
    "degrade": _stage_degrade,
    "prior": _stage_prior,
    "decoder_transfer": _stage_decoder_transfer,
    "encoder_transfer": _stage_encoder_transfer,
    "stablesr_sft": _stage_stablesr_sft,
    "stablesr_cfw": _stage_stablesr_cfw,
    "complexity": _stage_complexity,
    "evaluate": _stage_evaluate,
}


def run_stage(name: str, config_path: str | Path, **opts) -> None:
    """Run one stage of the pipeline described by ``config_path``.

    A training stage runs on every GPU the job may use (or ``$TVT_NUM_PROCESSES`` processes):
    it re-executes itself under ``accelerate launch`` (:mod:`tvt.launch`).
    """
    cfg = config_mod.load(config_path)
    stage = stages_mod.stage_by_name(cfg, name)
    handler = HANDLERS.get(name)
    if handler is None and name.startswith("download_"):
        handler = _stage_download(name.removeprefix("download_"))
    if handler is None and name.startswith("isr_"):
        handler = _stage_isr(name.removeprefix("isr_"))
    if handler is None and name.startswith("official_"):
        from tvt.official import stage_handler

        handler = stage_handler(name.removeprefix("official_"))
    if handler is None:
        raise StageError(f"stage {name!r} has no implementation in this version of tvt")
    for dep in stage.deps:
        producer = next((s.name for s in stages_mod.build_stages(cfg) if dep in s.outs + s.metrics), "?")
        _require(dep, producer)
    launched = launch.inside_distributed_launch(os.environ)
    if launch.uses_trainer(stage) and not launched:
        import torch

        processes = launch.wanted_processes(os.environ, torch.cuda.device_count())
        if processes > 1:  # the same command on every GPU; the ranks open the MLflow run, not this process
            flags = [f"--{key.replace('_', '-')}" for key, value in opts.items() if value is True]
            launch.relaunch(["stage", name, "--config", str(config_path), *flags], processes,
                            use_cpu=not torch.cuda.is_available())
            return
    if stage.resources.gpus == 0 and not launched:  # launched: the launcher shared the cores out
        _use_granted_cpus()
    with tracking.stage_run(name, cfg, stage.section, config_path) as run:
        handler(cfg, run, opts)


def _use_granted_cpus() -> None:
    """CPU stages use the cores this process may run on (a SLURM allocation, a taskset),
    not torch's default of every core of the node."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def run_pipeline(engine: str, config_path: str | Path, cores: int = 2, extra: list[str] | None = None) -> int:
    """Run the pipeline with Snakemake or DVC under one MLflow parent run.

    Snakemake opens the parent run itself (``onstart`` in the Snakefile); for DVC this
    function opens it and exports its id to the stage processes.
    """
    extra = [a for a in (extra or []) if a != "--"]
    if engine == "snakemake":
        # targets first: --configfile swallows every word after it
        cmd = [sys.executable, "-m", "snakemake", *extra, "--cores", str(cores), "--configfile", str(config_path)]
        return subprocess.call(cmd)
    cfg = config_mod.load(config_path)
    run_id = tracking.start_pipeline_run(cfg, config_path, "dvc")
    code = subprocess.call(["dvc", "repro", *extra], env={**os.environ, tracking.PIPELINE_ENV: run_id})
    tracking.end_pipeline_run(cfg, run_id, ok=code == 0)
    return code
