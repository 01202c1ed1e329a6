"""The stage registry: the ONE definition of every pipeline stage.

Snakemake (``workflow/rules/stages.smk``) builds its rules from this registry, and
``dvc.yaml`` is generated from it (``tvt workflow dvc``; a test fails when the committed
file drifts). Each stage names the config section it reads; Snakemake sees only that
section's hash as a rule parameter and DVC only that section as ``params``, so editing
e.g. ``evaluate`` never invalidates a training stage.

A stage exists in a given config iff its section exists there: training stages appear in
the DAG as their sections are configured, and the evaluation stage depends only on the
methods it scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from tvt.config import GLOBAL_KEYS, REPO_ROOT, params_hash, stage_params

RESOURCES = "resources"
RESULTS = "results"
DATA_DIR = f"{RESOURCES}/data"
DATASETS_DIR = f"{RESOURCES}/datasets"
PAIRS_DIR = f"{RESOURCES}/pairs"
MODELS_DIR = f"{RESOURCES}/models"
SD_DIR = f"{MODELS_DIR}/sd-base"
CKPT_DIR = f"{RESOURCES}/checkpoints"
VAE_D4_DECODER_DIR = f"{MODELS_DIR}/vae-d4-decoder"
VAE_D4_DIR = f"{MODELS_DIR}/vae-d4"
STABLESR_SFT_DIR = f"{MODELS_DIR}/stablesr-sft"
METRICS_FILE = f"{RESULTS}/metrics.json"
COMPLEXITY_FILE = f"{RESULTS}/complexity.json"
#: OCR accuracy vs text height, one column per method (`dvc plots show`)
OCR_PLOTS = tuple(f"{RESULTS}/plots/ocr_{m}_vs_text_px.csv" for m in ("acc", "ned"))
TABLES_DIR = f"{RESULTS}/tables"


@dataclass(frozen=True)
class Resources:
    """Scheduler resources (Snakemake's standard names, used by the SLURM profile)."""

    cpus: int = 2
    mem_mb: int = 4000
    runtime: int = 30  # minutes
    gpus: int = 0

    def snakemake(self) -> dict[str, int]:
        """Rule resources. GPU jobs ask for CPUs per GPU (the plugin would send a competing
        --cpus-per-task otherwise) and one node, so that 8 GPUs are never split."""
        res = {"mem_mb": self.mem_mb, "runtime": self.runtime}
        if self.gpus:
            res.update(gpu=self.gpus, cpus_per_gpu=max(1, self.cpus // self.gpus), nodes=1)
        else:
            res["cpus_per_task"] = self.cpus
        return res


@dataclass(frozen=True)
class Stage:
    name: str
    section: str | None  # config key the stage reads (besides GLOBAL_KEYS)
    description: str
    deps: tuple[str, ...] = ()  # data/model inputs produced by other stages or the user
    code: tuple[str, ...] = ()  # package sources whose change should rerun the stage
    outs: tuple[str, ...] = ()  # directories (cached, DVC-tracked)
    metrics: tuple[str, ...] = ()  # small JSON files (not cached, `dvc metrics show`)
    plots: tuple[str, ...] = ()
    resources: Resources = field(default_factory=Resources)
    retries: int = 0  # resubmissions after a failure (training resumes from its checkpoint)

    def command(self, config_path: str) -> str:
        return f"tvt stage {self.name} --config {config_path}"

    def params(self, cfg: Mapping) -> dict:
        return stage_params(cfg, self.section)

    def params_hash(self, cfg: Mapping) -> str:
        return params_hash(self.params(cfg))

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.deps + self.code


def code_files(*paths: str) -> tuple[str, ...]:
    """Expand package folders to their ``.py`` files (relative, POSIX, sorted).

    Stages depend on individual source files, not folders: a folder would also change
    when Python writes ``__pycache__`` into it, which would make DVC rerun for nothing.
    """
    files: list[str] = []
    for rel in paths:
        path = REPO_ROOT / rel
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [p.relative_to(REPO_ROOT).as_posix() for p in found if "__pycache__" not in p.parts]
    return tuple(files)


#: the model code a one-step restorer (TVT, OSEDiff, their ablations) is built from
ONE_STEP_MODEL_CODE = tuple(f"tvt/models/{name}.py" for name in (
    "ce_unet", "color_fix", "lora", "prompts", "restorer", "sd_configs", "tiling", "vae_d4"))


#: a paper-mode training job: one node with the paper's 8 GPUs, 8 CPU cores per GPU for its
#: data loader, and host memory for 8 processes that each load SD's UNet and VAE
PAPER_TRAIN_GPUS, PAPER_CPUS_PER_GPU, PAPER_TRAIN_MEM_MB = 8, 8, 256_000
#: resubmissions of a failed training job: each resumes from its last checkpoint
TRAINING_RETRIES = 3


def training_resources(paper: bool, runtime_min: int) -> Resources:
    """What a training stage asks the scheduler for; mini mode trains on 2 CPU cores, also on SLURM."""
    if not paper:
        return Resources(cpus=2, mem_mb=8000, runtime=120)
    return Resources(cpus=PAPER_TRAIN_GPUS * PAPER_CPUS_PER_GPU, mem_mb=PAPER_TRAIN_MEM_MB, runtime=runtime_min,
                     gpus=PAPER_TRAIN_GPUS)


def method_model_dir(method: str) -> str | None:
    """Where a trained restorer lives (None for training-free baselines)."""
    return None if method == "bicubic" else f"{MODELS_DIR}/{method}"


def build_stages(cfg: Mapping) -> list[Stage]:
    """All stages of the pipeline for this config, in topological order."""
    downloads = [
        Stage(f"download_{name}", f"data.datasets.{name}", f"download and verify {name}",
              code=code_files("tvt/data/download.py"), outs=(f"{DATASETS_DIR}/{name}",),
              resources=Resources(cpus=1, mem_mb=2000, runtime=600))
        for name in cfg["data"].get("datasets", {})
    ] if cfg["data"]["source"] == "download" else []
    stages = downloads + [
        Stage("data", "data", "assemble the dataset and its manifest",
              deps=tuple(o for d in downloads for o in d.outs),
              code=code_files("tvt/data"), outs=(DATA_DIR,),
              resources=Resources(cpus=1, mem_mb=4000, runtime=120)),
        Stage("degrade", "degrade", "synthesise LR/HR pairs (Real-ESRGAN second-order degradation)",
              deps=(DATA_DIR,), code=code_files("tvt/degradation.py"), outs=(PAIRS_DIR,),
              resources=Resources(cpus=cfg["degrade"]["workers"], mem_mb=8000, runtime=240)),
    ]
    gpu = cfg["mode"] == "paper"  # mini mode trains on CPU, also when submitted to SLURM
    train_code = code_files("tvt/training/engine.py", "tvt/training/losses.py", "tvt/training/data.py")
    if "prior" in cfg:
        if cfg["prior"]["source"] == "train":
            stages.append(Stage(
                "prior", "prior", "pre-train the tiny SD (VAE-D8 + UNet) that mini mode uses as its prior",
                deps=(PAIRS_DIR,), code=train_code + code_files("tvt/training/prior.py", "tvt/models/sd_configs.py"),
                outs=(SD_DIR,), resources=Resources(cpus=2, mem_mb=8000, runtime=120)))
        else:
            stages.append(Stage(
                "prior", "prior", "download SD 2.1-base (pinned revision) and embed the fixed prompts",
                code=code_files("tvt/models/sd_weights.py"), outs=(SD_DIR,),
                resources=Resources(cpus=2, mem_mb=16000, runtime=120)))
    if "decoder_transfer" in cfg:
        stages.append(Stage(
            "decoder_transfer", "decoder_transfer", "TVT stage 1: train the VAE-D4 decoder on frozen VAE-D8 latents",
            deps=(PAIRS_DIR, SD_DIR), code=train_code + code_files("tvt/training/vae_transfer.py", "tvt/models/vae_d4.py"),
            outs=(VAE_D4_DECODER_DIR,), retries=TRAINING_RETRIES if gpu else 0,
            resources=training_resources(gpu, 2880)))
    if "encoder_transfer" in cfg:
        stages.append(Stage(
            "encoder_transfer", "encoder_transfer", "TVT stage 2: train the VAE-D4 encoder into the frozen decoder's space",
            deps=(PAIRS_DIR, VAE_D4_DECODER_DIR),
            code=train_code + code_files("tvt/training/vae_transfer.py", "tvt/models/vae_d4.py"),
            outs=(VAE_D4_DIR,), retries=TRAINING_RETRIES if gpu else 0,
            resources=training_resources(gpu, 1440)))
    for name, variant in cfg.get("isr", {}).items():
        tvt = variant["method"] == "tvt"
        stages.append(Stage(
            f"isr_{name}", f"isr.{name}",
            f"one-step ISR training of '{name}' ({variant['method']}, {variant['unet']} UNet, t={variant['timestep']}) "
            "with L2 + LPIPS + VSD",
            deps=(PAIRS_DIR, SD_DIR) + ((VAE_D4_DIR,) if tvt else ()),
            code=train_code + code_files("tvt/training/isr.py", "tvt/training/vsd.py", *ONE_STEP_MODEL_CODE),
            outs=(method_model_dir(name),), retries=TRAINING_RETRIES if gpu else 0,
            resources=training_resources(gpu, 2880)))
    if "stablesr" in cfg:
        stablesr_code = code_files("tvt/models/stablesr.py", "tvt/models/stablesr_sampler.py",
                                   "tvt/models/tiling.py", "tvt/models/sd_configs.py")
        stages.append(Stage(
            "stablesr_sft", "stablesr.sft",
            "StableSR stage A: train the time-aware encoder + SFT layers on the frozen SD UNet",
            deps=(PAIRS_DIR, SD_DIR), code=train_code + stablesr_code + code_files("tvt/training/stablesr_sft.py"),
            outs=(STABLESR_SFT_DIR,), retries=TRAINING_RETRIES if gpu else 0, resources=training_resources(gpu, 2880)))
        stages.append(Stage(
            "stablesr_cfw", "stablesr",
            "StableSR stage B: sample stage-A latents, train CFW, save the StableSR restorer",
            deps=(PAIRS_DIR, SD_DIR, STABLESR_SFT_DIR),
            code=train_code + stablesr_code + code_files(
                "tvt/training/stablesr_cfw.py", "tvt/models/cfw.py", "tvt/models/stablesr_restorer.py",
                "tvt/models/color_fix.py", "tvt/models/prompts.py"),
            outs=(method_model_dir("stablesr"),), retries=TRAINING_RETRIES if gpu else 0, resources=training_resources(gpu, 2880)))
    # the authors' released weights: download (pinned sha256), `tvt import`, scored as <name>_official
    for name in cfg.get("official", {}):
        stages.append(Stage(
            f"official_{name}", f"official.{name}", f"download and convert the released {name} weights",
            deps=(SD_DIR,), code=code_files("tvt/official", "tvt/data/download.py", *ONE_STEP_MODEL_CODE),
            outs=(method_model_dir(f"{name}_official"),), resources=Resources(cpus=2, mem_mb=32000, runtime=240)))
    stages.append(Stage(
        "complexity", None, "parameters and MACs of every network at SD 2.1-base scale (meta device)",
        code=code_files("tvt/complexity.py", "tvt/models/vae_d4.py", "tvt/models/ce_unet.py",
                        "tvt/models/sd_configs.py", "tvt/models/stablesr.py", "tvt/models/cfw.py"),
        metrics=(COMPLEXITY_FILE,), resources=Resources(cpus=1, mem_mb=4000, runtime=10)))
    ev = cfg["evaluate"]
    # paper mode's real LR/HR test sets (RealSR, DRealSR, Real-CE) are read from the data stage's output
    real_pairs = [DATA_DIR] if ev.get("test_sets") else []
    eval_deps = [PAIRS_DIR, *real_pairs, COMPLEXITY_FILE, *(d for m in ev["methods"] if (d := method_model_dir(m))),
                 *ev.get("external", {}).values()]
    stages.append(
        Stage("evaluate", "evaluate", "score every method on the test split; write tables and figures",
              deps=tuple(eval_deps),
              code=code_files("tvt/evaluate.py", "tvt/reports.py", "tvt/stats.py", "tvt/data/paper_results.yaml",
                              "tvt/metrics", *(["tvt/data/paper.py"] if real_pairs else [])),
              outs=(TABLES_DIR,), metrics=(METRICS_FILE,), plots=OCR_PLOTS,
              resources=Resources(cpus=2, mem_mb=8000, runtime=120, gpus=1 if gpu else 0)))
    return stages


def stage_by_name(cfg: Mapping, name: str) -> Stage:
    stages = {s.name: s for s in build_stages(cfg)}
    if name not in stages:
        raise KeyError(f"unknown stage {name!r} for this config (stages: {', '.join(stages)})")
    return stages[name]


def dvc_yaml(cfg: Mapping, config_path: str = "config/config.yaml") -> dict:
    """The dvc.yaml document for this config, generated from the registry."""
    out: dict = {"stages": {}}
    for st in build_stages(cfg):
        keys = [*GLOBAL_KEYS] + ([st.section] if st.section else [])
        entry: dict = {"cmd": st.command(config_path), "desc": st.description}
        if st.inputs:
            entry["deps"] = list(st.inputs)
        entry["params"] = [{config_path: keys}]
        if st.outs:
            entry["outs"] = list(st.outs)
        if st.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in st.metrics]
        if st.plots:
            entry["plots"] = [{p: {"cache": False}} for p in st.plots]
        out["stages"][st.name] = entry
    # how `dvc plots show` draws the OCR curves: one line per method, HR as the upper bound
    columns = ["HR", *cfg["evaluate"]["methods"], *cfg["evaluate"].get("external", {})]
    out["plots"] = [{p: {"x": "text_px", "y": list(columns), "title": PurePosixPath(p).stem.replace("_", " ")}}
                    for p in OCR_PLOTS]
    return out


def render_dvc_yaml(cfg: Mapping, config_path: str = "config/config.yaml") -> str:
    import yaml

    header = ("# GENERATED from tvt/stages.py by `tvt workflow dvc` -- do not edit by hand.\n"
              "# tests/test_workflow.py fails when this file and the registry disagree.\n")
    return header + yaml.safe_dump(dvc_yaml(cfg, config_path), sort_keys=False, width=100)
