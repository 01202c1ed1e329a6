"""The stage registry: the ONE definition of every pipeline stage.

A stage is declared once (:func:`build_stages`): its config section, its handler (a function
of :mod:`tvt.runner`), the stages whose outputs it reads, what it writes and what it asks a
scheduler for. Snakemake (``workflow/rules/stages.smk``) builds its rules from this registry
and ``dvc.yaml`` is generated from it (``tvt workflow dvc``).

Outputs are content-addressed. A stage's **key** hashes everything that determines its
result: the stage's own parameters (``mode``, ``seed`` and its config section), the keys of
the stages it reads, and the source of every ``tvt`` module its handler imports, found from
the import graph (:func:`code_files`). A stage writes ``resources/store/<stage>/<key>/``
(evaluation and complexity under ``results/store/``), so

* two configs, or two ablations, coexist: their keys differ, their folders differ;
* switching config A -> B -> A reruns nothing the second time (A's folders are still there);
* no run of one config ever deletes or overwrites an output of another: an engine only
  (re)builds a folder whose key it computed, and a finished key is never rebuilt;
* the config's *path* is in no key: ``config/ci.yaml``, its absolute path or a copy name the
  same outputs;
* editing any module a stage imports gives the stage (and everything downstream) a new key.

The current outputs of the last pipeline run stay easy to find: ``resources/models/<method>``
and ``results/latest`` are links into the store (:func:`update_current_links`), and
``tvt where STAGE --config FILE`` prints the folder of any stage of any config.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path, PurePosixPath

from tvt.config import (
    GLOBAL_KEYS,
    OFFICIAL_SUFFIX,
    REPO_ROOT,
    WIDE_D8,
    evaluation_taggers,
    official_method,
    params_hash,
    stage_params,
    variant_section,
)

RESOURCES = "resources"
RESULTS = "results"
#: content-addressed outputs: <store>/<stage>/<key>/
STORE = f"{RESOURCES}/store"
RESULTS_STORE = f"{RESULTS}/store"
#: training checkpoints, <stage>/<checkpoint key>/: outside the output, so a rerun resumes from them
CKPT_DIR = f"{RESOURCES}/checkpoints"
#: one lock file per running stage instance (:func:`tvt.launch.exclusive`)
LOCKS_DIR = f"{RESOURCES}/locks"
#: links to the outputs of the newest pipeline run: ``tvt sr``'s default weights, README paths
MODELS_DIR = f"{RESOURCES}/models"
#: DVC's stable paths, <resources|results>/dvc/<stage>/: hard-linked views of the keyed folders
#: of the config in params.yaml (:func:`publish_view`)
VIEWS = "dvc"
#: the params file DVC reads and `dvc exp run -S` edits: the config, written by `tvt workflow dvc`
DVC_PARAMS = "params.yaml"
LATEST_RESULTS = f"{RESULTS}/latest"
METRICS_FILE = "metrics.json"
COMPLEXITY_FILE = "complexity.json"
TABLES = "tables"
#: OCR accuracy vs text height, one column per method (`dvc plots show`)
OCR_PLOTS = tuple(f"plots/ocr_{m}_vs_text_px.csv" for m in ("acc", "ned"))
#: length of a key in folder names (hex digits of a sha256)
KEY_LENGTH = 16
#: parameters that change how long a stage trains (or, StableSR's `sample`, only how its restorer is
#: published), not what a checkpoint holds: a stage resumes
#: from its checkpoints after such an edit (e.g. more steps), while its output key changes
RESUMABLE_KEYS = ("steps", "sample")
#: modules that run stages but do not shape their results: editing them reruns nothing
ORCHESTRATION_MODULES = frozenset({"tvt.__main__", "tvt.atomic", "tvt.cli", "tvt.config", "tvt.launch",
                                   "tvt.runner", "tvt.stages", "tvt.tracking"})


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
    """One stage: declaration (first block) and, once :func:`build_stages` keyed it, its paths."""

    name: str
    section: str | None  # config key the stage reads (besides GLOBAL_KEYS)
    description: str
    handler: str  # function of tvt.runner that runs the stage, called with a StageContext
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    external: tuple[str, ...] = ()  # user-provided inputs (evaluate.external folders)
    outs: tuple[str, ...] = ("",)  # folders, relative to the stage's folder ("" = the folder itself)
    metrics: tuple[str, ...] = ()  # small JSON files (not cached by DVC, `dvc metrics show`)
    plots: tuple[str, ...] = ()
    store: str = STORE
    trains: bool = False  # trains with tvt.training.engine.Trainer (data-parallel, checkpointed)
    resources: Resources = field(default_factory=Resources)
    retries: int | None = None  # resubmissions after a failure; None: the engine's (profile's) default
    #: a variant stage (``vae_variants``): the section whose values ``section`` overrides key by key
    base: str | None = None
    #: what the stage reads of the degrade stage's train split: None, ``hr`` (HR crops) or ``pairs``
    #: (HR and LR); the degrade stage writes the most any stage of the config reads (:func:`fixed_train_pairs`)
    train_split: str | None = None
    key: str = ""  # set by build_stages
    ckpt_key: str = ""
    code: tuple[str, ...] = ()  # set by build_stages: sources whose content is in the key

    @property
    def folder(self) -> str:
        """``<store>/<stage>/<key>``: everything this stage writes."""
        if not self.key:
            raise ValueError(f"stage {self.name!r} has no key yet (use build_stages)")
        return f"{self.store}/{self.name}/{self.key}"

    def _paths(self, rel: tuple[str, ...], base: str | None = None) -> tuple[str, ...]:
        base = self.folder if base is None else base
        return tuple(f"{base}/{r}" if r else base for r in rel)

    @property
    def out_paths(self) -> tuple[str, ...]:
        return self._paths(self.outs)

    @property
    def metric_paths(self) -> tuple[str, ...]:
        return self._paths(self.metrics)

    @property
    def plot_paths(self) -> tuple[str, ...]:
        return self._paths(self.plots)

    @property
    def products(self) -> tuple[str, ...]:
        """Every path the stage publishes; a downstream stage depends on all of them."""
        return self.out_paths + self.metric_paths + self.plot_paths

    @property
    def view(self) -> str:
        """``<resources|results>/dvc/<stage>``: where DVC finds this stage's current products, a path
        that does not move when a parameter changes (``dvc exp run -S``); see :func:`publish_view`."""
        return f"{PurePosixPath(self.store).parent}/{VIEWS}/{self.name}"

    def view_paths(self, rel: tuple[str, ...]) -> tuple[str, ...]:
        return self._paths(rel, self.view)

    @property
    def view_products(self) -> tuple[str, ...]:
        """The products under the view, in the order of :attr:`products`."""
        return self.view_paths(self.outs + self.metrics + self.plots)

    def is_built(self, root: Path = Path()) -> bool:
        """Whether every product exists. Outputs are published atomically, so existing means complete
        (the folder alone is not enough: Snakemake creates the parent folder of a file output)."""
        return all((root / p).exists() for p in self.products)

    @property
    def ckpt_dir(self) -> str:
        return f"{CKPT_DIR}/{self.name}/{self.ckpt_key}"

    @property
    def lock_file(self) -> str:
        return f"{LOCKS_DIR}/{self.name}-{self.key}.lock"

    @property
    def dvc_command(self) -> str:
        """DVC's command: no frozen key (Snakemake's rules carry one), the stage computes its key
        from params.yaml when it runs and publishes its :attr:`view`."""
        return f"python -m tvt stage {self.name} --config {DVC_PARAMS} --view"

    def params(self, cfg: Mapping) -> dict:
        """What the stage reads. A variant's section is its base section with the variant's values
        merged in, so editing the base reruns the variants too (their keys hash the merged values)."""
        params = stage_params(cfg, self.section)
        if self.base is not None:
            params[self.section] = variant_section(cfg, self.base, self.section)
        if self.name == "degrade":  # what its train split holds is decided by the stages that read it
            params["train_pairs"] = fixed_train_pairs(cfg)
        return params

    @property
    def config_keys(self) -> list[str]:
        """The config keys the stage reads (dvc.yaml's ``params``)."""
        return [*GLOBAL_KEYS, *((self.base,) if self.base else ()), *((self.section,) if self.section else ())]

    def params_hash(self, cfg: Mapping) -> str:
        return params_hash(self.params(cfg))


# ---- code dependencies from the import graph ---------------------------------------------------


def _module_file(module: str) -> Path | None:
    """The source file of a ``tvt`` module (a package's ``__init__.py``), None if there is none."""
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(nodes) -> set[str]:
    """``tvt`` modules named by the import statements among ``nodes`` (at any depth: most stage
    code imports lazily, inside functions). ``from tvt.x import y`` counts ``tvt.x.y`` when that is
    a module, else ``tvt.x``."""
    found: set[str] = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names if a.name.split(".")[0] == "tvt"}
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module and \
                    sub.module.split(".")[0] == "tvt":
                found.add(sub.module)
                found |= {f"{sub.module}.{a.name}" for a in sub.names if _module_file(f"{sub.module}.{a.name}")}
    return {m for m in found if _module_file(m) is not None}


@cache
def _module_imports(module: str, mtime_ns: int) -> frozenset[str]:
    path = _module_file(module)
    return frozenset(_imported_modules([ast.parse(path.read_text(encoding="utf-8"), str(path))]))


def _with_parents(module: str) -> set[str]:
    """Importing ``tvt.a.b`` runs ``tvt/__init__.py`` and ``tvt/a/__init__.py`` too."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(roots: set[str]) -> set[str]:
    """Every ``tvt`` module ``roots`` import, transitively, except orchestration modules."""
    todo, seen = [m for r in roots for m in _with_parents(r)], set()
    while todo:
        module = todo.pop()
        if module in seen or module in ORCHESTRATION_MODULES:
            continue
        seen.add(module)
        path = _module_file(module)
        for dep in _module_imports(module, path.stat().st_mtime_ns):
            todo += _with_parents(dep)
    return seen


@cache
def _runner_functions() -> dict[str, ast.FunctionDef]:
    path = REPO_ROOT / "tvt" / "runner.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def code_files(handler: str) -> tuple[str, ...]:
    """The sources a stage's result depends on: the ``tvt`` modules its handler (a function of
    :mod:`tvt.runner`) imports, and everything those import (relative POSIX paths, sorted).

    Derived, never written by hand, so a new import is covered the moment it is written.
    """
    functions = _runner_functions()
    if handler not in functions:
        raise KeyError(f"tvt/runner.py has no stage handler {handler!r}")
    modules = import_closure(_imported_modules([functions[handler]]))
    return tuple(sorted(_module_file(m).relative_to(REPO_ROOT).as_posix() for m in modules))


@lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256((REPO_ROOT / path).read_bytes()).hexdigest()


def code_digest(files: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for rel in files:
        st = (REPO_ROOT / rel).stat()
        out[rel] = _file_digest(rel, st.st_mtime_ns, st.st_size)
    return out


def _hash(document: Mapping) -> str:
    blob = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


# ---- the registry ---------------------------------------------------------------------------

#: a paper-mode training job: one node with the paper's 8 GPUs, 8 CPU cores per GPU for its
#: data loader, and host memory for 8 processes that each load SD's UNet and VAE
PAPER_TRAIN_GPUS, PAPER_CPUS_PER_GPU, PAPER_TRAIN_MEM_MB = 8, 8, 256_000
#: resubmissions of a failed training job: each resumes from its last checkpoint
TRAINING_RETRIES = 3


def training_resources(paper: bool, runtime_min: int) -> Resources:
    """What a training stage asks the scheduler for. Mini mode: one core, so that ``--cores N`` trains N
    independent stages side by side (the ablation variants, OSEDiff beside TVT's VAE chain): a mini
    stage spends 30-40 s in one-threaded start-up (imports, MLflow, validation, saving), which two
    stages on two cores overlap (docs/ablations.md, "Time")."""
    if not paper:
        return Resources(cpus=1, mem_mb=8000, runtime=120)
    return Resources(cpus=PAPER_TRAIN_GPUS * PAPER_CPUS_PER_GPU, mem_mb=PAPER_TRAIN_MEM_MB, runtime=runtime_min,
                     gpus=PAPER_TRAIN_GPUS)


def method_stage(method: str) -> str | None:
    """The stage that trains an evaluated method (None for training-free baselines)."""
    if method == "bicubic":
        return None
    if method == "stablesr":
        return "stablesr_cfw"
    if method.endswith(OFFICIAL_SUFFIX):
        return f"official_{method.removesuffix(OFFICIAL_SUFFIX)}"
    return f"isr_{method}"


def method_model_dir(method: str, cfg: Mapping | None = None) -> str | None:
    """Where a trained restorer lives: with ``cfg``, that config's own model in the store; without,
    the newest pipeline run's (``resources/models/<method>``, a link). None for bicubic."""
    stage = method_stage(method)
    if stage is None:
        return None
    return stage_by_name(cfg, stage).folder if cfg is not None else f"{MODELS_DIR}/{method}"


def _vae_recipe(decoder: Mapping) -> str:
    if decoder["architecture"] == WIDE_D8:
        return "the prior's VAE-D8 widened to 8 latent channels by channel interpolation, fine-tuned end to end (S3)"
    arch = f"VAE-D4 '{decoder['architecture']}'"
    if decoder["transfer"]:
        return f"{arch}, TVT stage 1 (its decoder on frozen VAE-D8 latents)"
    if decoder.get("latent_l2"):
        return f"{arch} end to end, latent aligned with VAE-D8's by L2 (T2)"
    return f"{arch} end to end from scratch (T1)"


def vae_stage(cfg: Mapping, variant: str | None = None) -> str:
    """The stage whose output is the finished VAE-D4 of ``variant`` (None: the main one).

    A variant trained with the two-stage transfer ends with its encoder stage; one trained end to
    end (T1, T2) is finished after its first stage. The main VAE always ends with
    ``encoder_transfer`` (stage names and keys of existing configs stay as they were)."""
    if variant is None:
        return "encoder_transfer"
    decoder = variant_section(cfg, "decoder_transfer", f"vae_variants.{variant}.decoder_transfer")
    return f"encoder_transfer_{variant}" if decoder["transfer"] else f"decoder_transfer_{variant}"


def isr_vae_stage(cfg: Mapping, name: str) -> str | None:
    """The VAE stage that ISR entry ``name`` reads: a VAE-D4 for method tvt, S3's 8-channel VAE-D8 for
    method osediff with ``vae`` (None: it uses the prior's VAE-D8)."""
    entry = cfg["isr"][name]
    return vae_stage(cfg, entry.get("vae")) if entry["method"] == "tvt" or "vae" in entry else None


def _declare(cfg: Mapping) -> list[Stage]:
    """Every stage of this config, in topological order, not yet keyed. A stage exists iff its
    config section does."""
    downloads = [
        Stage(f"download_{name}", f"data.datasets.{name}", f"download and verify {name}", "_stage_download",
              resources=Resources(cpus=1, mem_mb=2000, runtime=600))
        for name in cfg["data"].get("datasets", {})
    ] if cfg["data"]["source"] == "download" else []
    stages = downloads + [
        Stage("data", "data", "assemble the dataset and its manifest", "_stage_data",
              needs=tuple(d.name for d in downloads), resources=Resources(cpus=1, mem_mb=4000, runtime=120)),
        Stage("degrade", "degrade", "synthesise LR/HR pairs (Real-ESRGAN second-order degradation)",
              "_stage_degrade", needs=("data",),
              resources=Resources(cpus=cfg["degrade"]["workers"], mem_mb=8000, runtime=240)),
    ]
    gpu = cfg["mode"] == "paper"  # mini mode trains on CPU, also when submitted to SLURM
    retries = TRAINING_RETRIES if gpu else None

    def trainer(name, section, description, needs, runtime_min, train_split):
        return Stage(name, section, description, f"_stage_{name}", needs=needs, trains=True, retries=retries,
                     resources=training_resources(gpu, runtime_min), train_split=train_split)

    def fixed_or_online(section: Mapping) -> str | None:
        """An LR/HR trainer reads fixed train pairs unless it degrades online from the data stage."""
        return None if section.get("data") == "online" else "pairs"

    if "prior" in cfg:
        if cfg["prior"]["source"] == "train":
            stages.append(Stage(
                "prior", "prior", "pre-train the tiny SD (VAE-D8 + UNet) that mini mode uses as its prior",
                "_stage_prior_train", trains=True, train_split="hr",
                needs=("data", "degrade") if cfg["prior"].get("vae", {}).get("data") == "online" else ("degrade",),
                resources=Resources(cpus=2, mem_mb=8000, runtime=120)))
        else:
            stages.append(Stage(
                "prior", "prior", "download SD 2.1-base (pinned revision) and embed the fixed prompts",
                "_stage_prior_hub", resources=Resources(cpus=2, mem_mb=16000, runtime=120)))
    if "decoder_transfer" in cfg:
        stages.append(trainer("decoder_transfer", "decoder_transfer",
                              "TVT stage 1: train the VAE-D4 decoder on frozen VAE-D8 latents",
                              ("degrade", "prior"), 2880, "hr"))
    if "encoder_transfer" in cfg:
        stages.append(trainer("encoder_transfer", "encoder_transfer",
                              "TVT stage 2: train the VAE-D4 encoder into the frozen decoder's space",
                              ("degrade", "decoder_transfer"), 1440, "hr"))
    # VAE ablations (V1, V2, T1, T2): each variant trains its own VAE-D4 in stages of its own
    for name in cfg.get("vae_variants", {}):
        decoder = variant_section(cfg, "decoder_transfer", f"vae_variants.{name}.decoder_transfer")
        stages.append(dataclasses.replace(
            trainer("decoder_transfer", f"vae_variants.{name}.decoder_transfer",
                    f"VAE variant '{name}': {_vae_recipe(decoder)}", ("degrade", "prior"), 2880, "hr"),
            name=f"decoder_transfer_{name}", base="decoder_transfer"))
        if decoder["transfer"]:
            stages.append(dataclasses.replace(
                trainer("encoder_transfer", f"vae_variants.{name}.encoder_transfer",
                        f"VAE variant '{name}': TVT stage 2, its encoder into its frozen decoder's space",
                        ("degrade", f"decoder_transfer_{name}"), 1440, "hr"),
                name=f"encoder_transfer_{name}", base="encoder_transfer"))
    for name, variant in cfg.get("isr", {}).items():
        vae = isr_vae_stage(cfg, name)
        stage = trainer(f"isr_{name}", f"isr.{name}",
                        f"one-step ISR training of '{name}' ({variant['method']}, {variant['unet']} UNet, "
                        f"t={variant['timestep']}{', VAE ' + variant['vae'] if 'vae' in variant else ''}"
                        f"{', VAE-D8 skips' if variant.get('vae_skips') else ''}) "
                        "with L2 + LPIPS + VSD",
                        ("degrade", "prior") + ((vae,) if vae else ())
                        + (("data",) if variant.get("data") == "online" else ()), 2880, fixed_or_online(variant))
        stages.append(dataclasses.replace(stage, handler="_stage_isr"))
    if "stablesr" in cfg:
        stages.append(trainer("stablesr_sft", "stablesr.sft",
                              "StableSR stage A: train the time-aware encoder + SFT layers on the frozen SD UNet",
                              ("degrade", "prior") + (("data",) if cfg["stablesr"]["sft"].get("data") == "online"
                                                      else ()), 2880, fixed_or_online(cfg["stablesr"]["sft"])))
        # stage B samples stage A once per training pair: the fixed train pairs, or (`cfw.data: online`) its own
        # `cfw.pairs` pairs drawn with `stablesr.degrade` from the data stage's photos, as StableSR's
        # scripts/generate_vqgan_data.py `main` draws them; val pairs come from the degrade stage either way
        cfw = cfg["stablesr"]["cfw"]
        stages.append(trainer("stablesr_cfw", "stablesr",
                              "StableSR stage B: sample stage-A latents, train CFW, save the StableSR restorer",
                              ("degrade", "prior", "stablesr_sft") + (("data",) if cfw.get("data") == "online" else ()),
                              2880, fixed_or_online(cfw)))
    # the authors' released weights: download (pinned sha256), `tvt import`, scored as <name>_official
    for name in cfg.get("official", {}):
        stages.append(Stage(
            f"official_{name}", f"official.{name}", f"download and convert the released {name} weights",
            "_stage_official", needs=("prior",), resources=Resources(cpus=2, mem_mb=32000, runtime=240)))
    stages.append(Stage(
        "complexity", None, "parameters and MACs of every network at SD 2.1-base scale (meta device)",
        "_stage_complexity", outs=(), metrics=(COMPLEXITY_FILE,), store=RESULTS_STORE,
        resources=Resources(cpus=1, mem_mb=4000, runtime=10)))
    ev = cfg["evaluate"]
    # paper mode's real LR/HR test sets (RealSR, DRealSR, Real-CE) are read from the data stage's output
    needs = ["degrade", *(["data"] if ev.get("test_sets") else []), "complexity",
             *(s for m in ev["methods"] if (s := method_stage(m)))]
    if ev.get("claims") and cfg["mode"] == "mini":  # the claims table reads the data and both VAEs too
        needs += [n for n in ("data", "prior", "encoder_transfer") if n in {st.name for st in stages} and n not in needs]
    # tagged prompts (evaluate.tagger) go through the SD snapshot's CLIP text encoder
    if any(t != "none" for t in evaluation_taggers(cfg).values()) and "prior" not in needs:
        needs.append("prior")
    stages.append(Stage(
        "evaluate", "evaluate", "score every method on the test split; write tables and figures", "_stage_evaluate",
        needs=tuple(needs), external=tuple(ev.get("external", {}).values()), outs=(TABLES,),
        metrics=(METRICS_FILE,), plots=OCR_PLOTS, store=RESULTS_STORE,
        resources=Resources(cpus=2, mem_mb=8000, runtime=120, gpus=1 if gpu else 0)))
    return stages


def _checkpoint_params(section):
    """A section without its :data:`RESUMABLE_KEYS`, except ``steps`` under a decaying learning rate
    (``lr_decay``): the rate at every update depends on the total, so more steps is another run."""
    if not isinstance(section, dict):
        return section
    decays = section.get("lr_decay", "constant") != "constant"
    return {k: v for k, v in section.items() if k not in RESUMABLE_KEYS or (k == "steps" and decays)}


#: the order of :data:`tvt.degradation.TRAIN_PAIRS` by what it holds: a stage reading ``pairs`` also reads HR
_TRAIN_SPLIT_RANK = {"none": 0, "hr": 1, "pairs": 2}


def fixed_train_pairs(cfg: Mapping) -> str:
    """What the degrade stage writes for the train split (:data:`tvt.degradation.TRAIN_PAIRS`): the most
    that any stage of this config reads (:attr:`Stage.train_split`).

    ``pairs`` when a trainer reads fixed LR/HR pairs (``data: fixed``, StableSR's stages included); ``hr`` when
    only HR crops are read (the VAE transfer stages and mini mode's prior train autoencoders on HR);
    ``none`` when every trainer degrades online. It is part of the degrade stage's key, so switching
    a trainer from online to fixed data writes a new pairs folder that has the train LR."""
    return max((st.train_split or "none" for st in _declare(cfg)), key=_TRAIN_SPLIT_RANK.__getitem__)


def build_stages(cfg: Mapping) -> list[Stage]:
    """All stages of the pipeline for this config, in topological order, keyed (see the module doc)."""
    keyed: dict[str, Stage] = {}
    for st in _declare(cfg):
        code = code_files(st.handler)
        params = st.params(cfg)
        document = {"stage": st.name, "params": params, "needs": {n: keyed[n].key for n in st.needs},
                    "external": list(st.external), "code": code_digest(code)}
        resumable = _checkpoint_params(params.get(st.section)) if st.section else None
        ckpt = {**document, "params": {**params, st.section: resumable} if st.section else params}
        keyed[st.name] = dataclasses.replace(st, key=_hash(document), ckpt_key=_hash(ckpt), code=code)
    return list(keyed.values())


def stage_by_name(cfg: Mapping, name: str) -> Stage:
    stages = {s.name: s for s in build_stages(cfg)}
    if name not in stages:
        raise KeyError(f"unknown stage {name!r} for this config (stages: {', '.join(stages)})")
    return stages[name]


def with_upstream(stages: list[Stage], names: set[str]) -> list[Stage]:
    """The named stages and every stage they read from, directly or not, in pipeline order: what a
    run of those targets may have to build."""
    by_name = {st.name: st for st in stages}
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].needs)
    return [st for st in stages if st.name in wanted]


def inputs_of(stage: Stage, stages: Mapping[str, Stage]) -> tuple[str, ...]:
    """The paths a stage reads: its upstream stages' products and its external inputs."""
    return tuple(p for n in stage.needs for p in stages[n].products) + stage.external


# ---- the newest run's outputs under stable names -------------------------------------------------


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (relative, atomically); a real folder in the way is left alone."""
    if link.exists() and not link.is_symlink():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def _lpips_nets(node) -> set[str]:
    """The LPIPS ``net``s a (nested) section's losses load: wherever ``lpips_net`` stands beside a
    positive ``lpips_weight`` (autoencoder losses) or ``lambda_lpips`` (ISR)."""
    if not isinstance(node, Mapping):
        return set()
    nets = set().union(*(_lpips_nets(v) for v in node.values()))
    if "lpips_net" in node and max(node.get("lpips_weight", 0), node.get("lambda_lpips", 0)) > 0:
        nets.add(node["lpips_net"])
    return nets


def perceptual_weights_needed(cfg: Mapping, stages: list[Stage]) -> dict[str, list[str]]:
    """``{metric: [stage, ...]}``: the LPIPS trunks these stages cannot train without — their losses'
    and, for the ISR stages, the validation LPIPS (``METRIC_LPIPS_NET``). Metric names are those of
    :func:`tvt.metrics.perceptual.weights_available`. The evaluation is not listed: it records a
    metric it cannot build as unavailable instead of failing."""
    from tvt.weights import LPIPS_METRICS, METRIC_LPIPS_NET

    needed: dict[str, list[str]] = {}
    for st in stages:
        if not st.trains:
            continue
        nets = _lpips_nets(st.params(cfg)[st.section])
        if st.handler == "_stage_isr":
            nets.add(METRIC_LPIPS_NET)
        for net in sorted(nets):
            needed.setdefault(LPIPS_METRICS[net], []).append(st.name)
    return needed


def missing_perceptual_weights(cfg: Mapping, stages: list[Stage]) -> str | None:
    """Why these stages would fail for want of perceptual weights (None when they would not), said
    before a pipeline starts rather than by its first LPIPS stage, minutes or hours in."""
    needed = perceptual_weights_needed(cfg, stages)
    if not needed:
        return None
    from tvt.metrics.perceptual import weights_available
    from tvt.weights import FETCH_COMMAND, default_weights_dir

    available = weights_available()
    missing = {metric: names for metric, names in needed.items() if not available[metric]}
    if not missing:
        return None
    what = "; ".join(f"{metric} (for {', '.join(names)})" for metric, names in missing.items())
    return (f"the perceptual weights these stages train with are missing: {what}. Run `{FETCH_COMMAND}` "
            f"(writes {default_weights_dir()}), or point TVT_WEIGHTS_DIR at a cache it made.")


def update_current_links(cfg: Mapping, root: Path = Path()) -> list[str]:
    """Point ``resources/models/<method>`` and ``results/latest`` at this config's outputs that
    exist; return the links made. Called when a pipeline run succeeds."""
    made = []
    for st in build_stages(cfg):
        if not st.is_built(root):
            continue
        if st.name == "evaluate":
            link = LATEST_RESULTS
        elif st.name == "stablesr_cfw":
            link = f"{MODELS_DIR}/stablesr"
        elif st.name.startswith("isr_"):
            link = f"{MODELS_DIR}/{st.name.removeprefix('isr_')}"
        elif st.name.startswith("official_"):
            link = f"{MODELS_DIR}/{official_method(st.name.removeprefix('official_'))}"
        else:
            continue
        _link(root / link, root / st.folder)
        made.append(link)
    return made


# ---- DVC: stable views of the keyed folders -------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links (or another device): copy
        shutil.copy2(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_view(stage: Stage, root: Path = Path()) -> None:
    """Make ``stage.view`` show the stage's keyed folder: every product is replaced, atomically and
    one at a time, by hard links to the keyed files (no data is copied).

    DVC tracks these stable paths, not the keyed folders, so ``dvc exp run -S`` can change a
    parameter: the stage resolves its key from params.yaml when it runs, builds that keyed folder
    if it is new (a finished one is never rebuilt), and republishes its view; DVC sees the view
    change and runs what depends on it. Whatever DVC does to a view (delete it before a run, check
    another experiment out into it) unlinks or replaces entries of the view; the store's files keep
    their own names and contents.
    """
    if not stage.is_built(root):
        raise FileNotFoundError(f"stage {stage.name}: {stage.folder} is not built, there is nothing to publish")
    for src, dst in zip(stage.products, stage.view_products, strict=True):
        src, dst = root / src, root / dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = (dst.with_name(f".{dst.name}.{os.getpid()}.{suffix}") for suffix in ("tmp", "old"))
        _remove(tmp)
        if src.is_dir():
            shutil.copytree(src, tmp, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, tmp)
        if dst.is_dir() and not dst.is_symlink():  # a folder cannot be renamed over another
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)


def adopt_view(stage: Stage, root: Path = Path()) -> bool:
    """Rebuild a missing keyed folder from the stage's view (hard links again); return whether it did.

    After ``dvc pull`` on another clone, DVC has the views but this clone's store is empty, and a
    stage that DVC then runs needs its inputs' keyed folders. Sound only under DVC: a DVC stage
    runs after DVC found its inputs' views up to date with params.yaml and the code files, exactly
    what their keys hash, so each view holds the folder of the key computed now.
    """
    views = [root / p for p in stage.view_products]
    if stage.is_built(root) or not all(p.exists() for p in views):
        return False
    folder = root / stage.folder
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.adopt")
    _remove(tmp)
    tmp.mkdir(parents=True)
    for rel, view in zip(stage.outs + stage.metrics + stage.plots, views, strict=True):
        target = tmp / rel if rel else tmp
        target.parent.mkdir(parents=True, exist_ok=True)
        if view.is_dir():
            shutil.copytree(view, target, copy_function=_link_or_copy, dirs_exist_ok=not rel)
        else:
            _link_or_copy(str(view), str(target))
    os.replace(tmp, folder)
    return True


def dvc_yaml(cfg: Mapping) -> dict:
    """The dvc.yaml document for this config, generated from the registry.

    Every stage reads params.yaml (its own section and the global keys: DVC's ``params``), the
    views of the stages it needs and the source files in its key (``deps``), and writes its view
    (``outs``, ``metrics``, ``plots``). No path carries a key, so ``dvc exp run -S isr.tvt.lr=1e-4``
    works in DVC's own idiom and the file changes only when the registry does (stages, code files).
    Metrics and plots are cached like any output: ``dvc exp show`` reads every experiment's
    metrics from the cache, with no results file committed to git.
    """
    out: dict = {"stages": {}}
    stages = {st.name: st for st in build_stages(cfg)}
    for st in stages.values():
        entry: dict = {"cmd": st.dvc_command, "desc": st.description,
                       "deps": [*(p for n in st.needs for p in stages[n].view_products), *st.external, *st.code],
                       "params": st.config_keys}
        for field_name, rel in (("outs", st.outs), ("metrics", st.metrics), ("plots", st.plots)):
            if rel:
                entry[field_name] = list(st.view_paths(rel))
        out["stages"][st.name] = entry
    # how `dvc plots show` draws the OCR curves: one line per method, HR as the upper bound
    columns = ["HR", *cfg["evaluate"]["methods"], *cfg["evaluate"].get("external", {})]
    out["plots"] = [{p: {"x": "text_px", "y": list(columns), "title": PurePosixPath(p).stem.replace("_", " ")}}
                    for p in stages["evaluate"].view_paths(stages["evaluate"].plots)]
    return out


def render_dvc_yaml(cfg: Mapping, source: str = "config/config.yaml") -> str:
    import yaml

    header = (f"# GENERATED from tvt/stages.py for {source} by `tvt workflow dvc --config {source}`, together\n"
              f"# with {DVC_PARAMS} (that config; `dvc exp run -S key=value` edits it). Stages resolve their\n"
              "# keyed folders from the params when they run; DVC tracks their views (README, section Running).\n")
    return header + yaml.safe_dump(dvc_yaml(cfg), sort_keys=False, width=100)


def render_dvc_params(cfg: Mapping, source: str = "config/config.yaml") -> str:
    import yaml

    header = (f"# GENERATED from {source} by `tvt workflow dvc --config {source}`: the config that DVC's\n"
              "# stages read. Change values with `dvc exp run -S isr.tvt.lr=1e-4`, or edit the config and\n"
              "# regenerate. Validated by every stage (workflow/schemas/config.schema.yaml).\n")
    return header + yaml.safe_dump(dict(cfg), sort_keys=False, width=100)
