"""Stage execution: what ``tvt stage NAME`` does, for Snakemake and DVC alike.

Each stage reads its own config section, opens its MLflow run (nested under the pipeline run
when there is one) and writes its content-addressed folder (:mod:`tvt.stages`) atomically: into
``<folder>.tmp`` first, renamed into place only when the stage succeeded, so a killed or failed
stage never leaves a half-written output that a later run could mistake for a finished one, and
a finished folder is never rebuilt. The handlers below are the registry's: ``Stage.handler``
names one, and the modules it imports are the stage's code dependencies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tvt import config as config_mod
from tvt import launch, tracking
from tvt import stages as stages_mod
from tvt.atomic import atomic_dir, fsync_dir

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run (missing input, stale workflow file, unsupported mode); the message says why."""


@dataclass(frozen=True)
class StageContext:
    """What a handler gets: its config, MLflow run and options, and the folders of its stage and of
    the stages it reads (all from the registry: a handler never names a path itself)."""

    stage: stages_mod.Stage
    cfg: Mapping
    run: tracking.StageRun
    opts: Mapping
    inputs: Mapping[str, Path]  # upstream stage name -> its folder

    @property
    def folder(self) -> Path:
        return Path(self.stage.folder)

    @property
    def ckpt_dir(self) -> Path:
        """Checkpoints live outside the output, keyed without the resumable keys (``steps``): a rerun
        after a failure, or with more steps, resumes from them."""
        return Path(self.stage.ckpt_dir)

    def input(self, name: str) -> Path:
        return self.inputs[name]

    @property
    def stage_cfg(self) -> Mapping:
        """The config as the training code reads it: a variant stage's merged section stands in for
        its base section (``decoder_transfer_v1`` trains from ``cfg["decoder_transfer"]``)."""
        if self.stage.base is None:
            return self.cfg
        return {**self.cfg, self.stage.base: self.stage.params(self.cfg)[self.stage.section]}


def _stage_data(ctx: StageContext) -> None:
    data = ctx.cfg["data"]
    with atomic_dir(ctx.folder) as out:
        if data["source"] == "mini":
            from tvt.data.mini import build_mini_dataset

            manifest = build_mini_dataset(data, out, ctx.cfg["seed"])
        else:
            from tvt.data.paper import assemble_paper_dataset

            with tempfile.TemporaryDirectory(prefix="tvt-datasets-") as view:  # name -> its download folder
                for name, folder in ctx.inputs.items():
                    (Path(view) / name.removeprefix("download_")).symlink_to(folder.resolve())
                manifest = assemble_paper_dataset(data, out, Path(view))
        from tvt.data.manifest import read_manifest

        rows = read_manifest(manifest)
        real_pairs = out / "real_pairs.csv"  # paper mode's real LR/HR test sets, scored as they are
        if real_pairs.is_file():
            ctx.run.log_metrics({"n_real_pairs": len(read_manifest(real_pairs))})
            ctx.run.log_artifact(real_pairs)
        counts: dict[str, int] = {}
        for row in rows:
            key = f"n_{row['kind']}_{row['split']}"
            counts[key] = counts.get(key, 0) + 1
        ctx.run.log_metrics({"n_images": len(rows), **counts})
        ctx.run.log_artifact(manifest)


def _stage_download(ctx: StageContext) -> None:
    """Archives download into the checkpoint area (a failed download resumes there); the
    verified dataset is then renamed into the stage's folder."""
    from tvt.data.download import fetch_dataset

    name = ctx.stage.name.removeprefix("download_")
    target = fetch_dataset(name, ctx.cfg["data"]["datasets"][name], ctx.ckpt_dir,
                           trust_new_hashes=ctx.opts.get("trust_new_hashes", False))
    ctx.folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(target, ctx.folder)
    fsync_dir(ctx.folder.parent)
    ctx.run.log_artifact(ctx.folder / ".complete", "download")


def _stage_degrade(ctx: StageContext) -> None:
    from tvt.data.manifest import read_manifest
    from tvt.degradation import synthesize_pairs

    manifest = ctx.input("data") / "manifest.csv"
    deg = ctx.cfg["degrade"]
    with atomic_dir(ctx.folder) as out:
        pairs = synthesize_pairs(manifest, out, deg, ctx.cfg["seed"], workers=deg["workers"],
                                 train=stages_mod.fixed_train_pairs(ctx.cfg))
        ctx.run.log_metrics({"n_pairs": len(read_manifest(pairs))})
        ctx.run.log_artifact(pairs)


def _stage_prior_hub(ctx: StageContext) -> None:
    from tvt.models.sd_weights import fetch_sd_base

    with atomic_dir(ctx.folder) as out:
        fetch_sd_base(ctx.cfg["prior"], out)


def _stage_prior_train(ctx: StageContext) -> None:
    from tvt.training.prior import run_prior

    run_prior(ctx.cfg, ctx.input("degrade"), ctx.folder, ctx.ckpt_dir, ctx.run, data_dir=ctx.inputs.get("data"))


def _stage_decoder_transfer(ctx: StageContext) -> None:
    from tvt.training.vae_transfer import run_decoder_transfer

    run_decoder_transfer(ctx.stage_cfg, ctx.input("degrade"), ctx.input("prior"), ctx.folder, ctx.ckpt_dir,
                         ctx.run)


def _stage_encoder_transfer(ctx: StageContext) -> None:
    from tvt.training.vae_transfer import run_encoder_transfer

    decoder = next(n for n in ctx.stage.needs if n.startswith("decoder_transfer"))  # the variant's own
    run_encoder_transfer(ctx.stage_cfg, ctx.input("degrade"), ctx.input(decoder), ctx.folder, ctx.ckpt_dir, ctx.run)


def _stage_isr(ctx: StageContext) -> None:
    from tvt.training.isr import run_isr

    name = ctx.stage.name.removeprefix("isr_")
    vae = stages_mod.isr_vae_stage(ctx.cfg, name)  # its VAE stage: a VAE-D4, or S3's VAE-D8 (None: the prior's)
    run_isr(ctx.cfg, name, ctx.input("degrade"), ctx.input("prior"), ctx.input(vae) if vae else None, ctx.folder,
            ctx.ckpt_dir, ctx.run, data_dir=ctx.inputs.get("data"))


def _stage_stablesr_sft(ctx: StageContext) -> None:
    from tvt.training.stablesr_sft import run_stablesr_sft

    run_stablesr_sft(ctx.cfg, ctx.input("degrade"), ctx.input("prior"), ctx.folder, ctx.ckpt_dir, ctx.run,
                     data_dir=ctx.inputs.get("data"))


def _stage_stablesr_cfw(ctx: StageContext) -> None:
    from tvt.training.stablesr_cfw import run_stablesr_stage_b

    run_stablesr_stage_b(ctx.cfg, ctx.input("degrade"), ctx.input("prior"), ctx.input("stablesr_sft"), ctx.folder,
                         ctx.ckpt_dir, ctx.run, data_dir=ctx.inputs.get("data"))


def _stage_official(ctx: StageContext) -> None:
    from tvt.official import run_official_stage

    with atomic_dir(ctx.folder) as out:
        run_official_stage(ctx.stage.name.removeprefix("official_"), ctx.cfg, ctx.run, ctx.opts, ctx.input("prior"),
                           out, Path(stages_mod.RESOURCES) / "official")


def _stage_complexity(ctx: StageContext) -> None:
    from tvt.complexity import compute_complexity, to_json, to_markdown

    rows = compute_complexity(output_size=512)  # the paper's setting: x4 to 512², SD 2.1-base scale
    with atomic_dir(ctx.folder) as out:
        (out / stages_mod.COMPLEXITY_FILE).write_text(to_json(rows) + "\n")
    ctx.run.log_text(to_markdown(rows), "complexity.md")
    ctx.run.log_artifact(ctx.folder / stages_mod.COMPLEXITY_FILE)


def _stage_evaluate(ctx: StageContext) -> None:
    """The evaluation, then what the Snakemake report shows of it: the tables as HTML and the training curves."""
    from tvt.evaluate import evaluate
    from tvt.report_assets import write_html_tables, write_training_curves

    models = {m: ctx.input(s) for m in ctx.cfg["evaluate"]["methods"] if (s := stages_mod.method_stage(m))}
    with atomic_dir(ctx.folder) as out:
        tables = out / stages_mod.TABLES
        tables.mkdir()
        evaluate(ctx.cfg, ctx.input("degrade") / "pairs.csv", tables, out / stages_mod.METRICS_FILE,
                 ctx.run, plots_dir=out / "plots", complexity_file=ctx.input("complexity") / stages_mod.COMPLEXITY_FILE,
                 data_dir=ctx.inputs.get("data"), model_dirs=models, text_encoder=ctx.inputs.get("prior"))
        write_html_tables(tables, tables / "html")
        write_training_curves(ctx.cfg, tables / "curves")


def _handler(stage: stages_mod.Stage) -> Callable[[StageContext], None]:
    handler = globals().get(stage.handler)
    if handler is None:
        raise StageError(f"stage {stage.name!r}: tvt.runner has no handler {stage.handler!r}")
    return handler


def run_stage(name: str, config_path: str | Path, expected_key: str | None = None, view: bool = False,
              **opts) -> None:
    """Run one stage of the pipeline described by ``config_path``.

    Nothing is rebuilt: a stage whose folder exists (published atomically, so complete) returns at
    once. Otherwise it takes the stage's lock (a second instance refuses to start), dies with its
    parent (no orphan trainer when Snakemake or the job's shell is killed) and runs its handler.
    A training stage runs on every GPU the job may use (or ``$TVT_NUM_PROCESSES`` processes): it
    re-executes itself under ``accelerate launch`` (:mod:`tvt.launch`).

    ``expected_key`` (Snakemake's rules) refuses a config or code that no longer gives the key the
    workflow was built for; ``view`` (DVC's stages) publishes the keyed folder at the stage's stable
    path afterwards (:func:`tvt.stages.publish_view`), after checking that dvc.yaml still declares
    what the registry says this stage reads and writes, and takes inputs missing from the store
    from their views (:func:`tvt.stages.adopt_view`).
    """
    cfg = config_mod.load(config_path)
    try:
        stage = stages_mod.stage_by_name(cfg, name)
    except KeyError as exc:
        raise StageError(exc.args[0]) from None
    if expected_key is not None and expected_key != stage.key:
        raise StageError(
            f"stage {name}: {config_path} or the code changed since the workflow file was written (key "
            f"{stage.key}, workflow expects {expected_key}): regenerate it (`tvt workflow dvc --config "
            f"{config_path}`, or run `tvt pipeline`), so that the new result gets its own folder")
    launched = launch.inside_distributed_launch(os.environ)
    if view and not launched:
        _check_dvc_entry(cfg, stage, config_path)
        registry = {s.name: s for s in stages_mod.build_stages(cfg)}
        for need in stage.needs:  # after `dvc pull`: this clone's store starts from DVC's views
            if stages_mod.adopt_view(registry[need]):
                log.info("%s: adopted %s from its DVC view", name, registry[need].folder)
    _build(stage, cfg, config_path, launched, opts)
    if view and not launched:
        stages_mod.publish_view(stage)


def _check_dvc_entry(cfg: Mapping, stage: stages_mod.Stage, config_path: str | Path,
                     dvc_file: Path = Path("dvc.yaml")) -> None:
    """A DVC stage runs only if dvc.yaml declares what the registry says it reads and writes: a new
    import (a code dependency DVC would not watch) or a config whose stages changed must regenerate it."""
    import yaml

    declared = yaml.safe_load(dvc_file.read_text())["stages"].get(stage.name) if dvc_file.is_file() else None
    if declared != stages_mod.dvc_yaml(cfg)["stages"][stage.name]:
        raise StageError(
            f"stage {stage.name}: {dvc_file} does not declare this stage's current inputs, code and outputs "
            f"(the code or the stages of {config_path} changed since it was written): regenerate it with "
            f"`tvt workflow dvc --config {config_path}`")


def _build(stage: stages_mod.Stage, cfg: Mapping, config_path: str | Path, launched: bool, opts: Mapping) -> None:
    """Build the stage's keyed folder unless it is built (see :func:`run_stage`)."""
    name = stage.name
    handler = _handler(stage)
    quiet_progress_bars()
    if not launched:
        launch.die_with_parent()
        if stage.is_built():
            log.info("%s: up to date (%s)", name, stage.folder)
            return
    registry = {s.name: s for s in stages_mod.build_stages(cfg)}
    for dep in stages_mod.inputs_of(stage, registry):
        if not Path(dep).exists():
            producer = next((s.name for s in registry.values() if dep in s.products), None)
            hint = f"run the '{producer}' stage first (e.g. `snakemake --cores 2 {producer}`)" if producer else \
                "it is an external input named in the config"
            raise StageError(f"{dep} is missing: {hint}")
    inputs = {n: Path(registry[n].folder) for n in stage.needs}
    with contextlib.ExitStack() as stack:
        if not launched:  # the ranks of a launch run under their parent's lock
            stack.enter_context(launch.exclusive(Path(stage.lock_file), f"stage {name}"))
        if stage.trains and not launched:
            import torch

            processes = launch.wanted_processes(os.environ, torch.cuda.device_count())
            if processes > 1:  # the same command on every GPU; the ranks open the MLflow run, not this process
                flags = [f"--{key.replace('_', '-')}" for key, value in opts.items() if value is True]
                launch.relaunch(["stage", name, "--config", str(config_path), *flags], processes,
                                use_cpu=not torch.cuda.is_available())
                return
        if stage.resources.gpus == 0 and not launched:  # launched: the launcher shared the cores out
            _use_granted_cpus()
        with tracking.stage_run(name, cfg, stage.section, config_path, tags={"tvt.key": stage.key},
                                params=stage.params(cfg)) as run:
            handler(StageContext(stage, cfg, run, opts, inputs))


#: seconds between two progress-bar updates in a log file (SLURM, Snakemake's log:, a pipe)
LOG_PROGRESS_INTERVAL_S = 60


def quiet_progress_bars(stream=None) -> None:
    """Progress bars redraw many times a second, which fills a log file that is no terminal with
    carriage returns: there, every tqdm bar updates once a minute (tqdm reads ``TQDM_*`` defaults
    from the environment, also in the relaunched ranks). A value the user set is kept."""
    stream = sys.stderr if stream is None else stream
    if not (hasattr(stream, "isatty") and stream.isatty()):
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_INTERVAL_S))
        os.environ.setdefault("TQDM_MAXINTERVAL", str(10 * LOG_PROGRESS_INTERVAL_S))


def granted_threads(environ: Mapping[str, str] | None = None) -> int:
    """The threads a CPU stage may compute with: the cores this process may run on (a SLURM
    allocation, a taskset), fewer when its launcher granted fewer -- Snakemake exports a rule's
    ``threads`` as ``OMP_NUM_THREADS``, so two 1-thread mini stages share a 2-core machine side by
    side instead of oversubscribing it. Never torch's default of every core of the node."""
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0))
    granted = environ.get("OMP_NUM_THREADS", "").strip()
    return max(1, min(cores, int(granted)) if granted.isdigit() and int(granted) > 0 else cores)


def _use_granted_cpus() -> None:
    import torch

    torch.set_num_threads(granted_threads())


def interpreter_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` with this interpreter's folder first on PATH: the ``python -m tvt`` of a workflow
    file is then the project's, activated or not."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def write_dvc_yaml(config_path: str | Path, output: Path = Path("dvc.yaml")) -> tuple[dict, str]:
    """Write the dvc.yaml of a config and, beside it, params.yaml (the config, which DVC's stages
    read and ``dvc exp run -S`` edits); return the config and its name, relative to the project
    when it lies inside it, so that every spelling of one config writes the same files. A file
    whose text would not change is not touched."""
    cfg = config_mod.load(config_path)
    path = Path(config_path).resolve()
    root = Path.cwd().resolve()
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    for target, text in ((output, stages_mod.render_dvc_yaml(cfg, name)),
                         (output.parent / stages_mod.DVC_PARAMS, stages_mod.render_dvc_params(cfg, name))):
        if not target.is_file() or target.read_text() != text:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
    return cfg, name


_DVC_WHOLE_PIPELINE = {"-p", "--pipeline", "-P", "--all-pipelines", "-R", "--recursive", "--glob", "--downstream"}


def dvc_stages_to_run(cfg: Mapping, dvc_args: list[str]) -> list[stages_mod.Stage]:
    """The stages ``dvc repro <dvc_args>`` may build: its targets (a stage name, or ``path:name``) with
    everything upstream of them, or the targets alone with ``-s``. Every stage when there is no target,
    a target that is not a stage name, or an option that widens the run (the preflight then errs on the
    side of checking too much)."""
    every = stages_mod.build_stages(cfg)
    targets = {a.rpartition(":")[2] for a in dvc_args if not a.startswith("-")}
    if not targets or not targets <= {st.name for st in every} or _DVC_WHOLE_PIPELINE & set(dvc_args):
        return every
    if {"-s", "--single-item"} & set(dvc_args):
        return [st for st in every if st.name in targets]
    return stages_mod.with_upstream(every, targets)


def run_pipeline(engine: str, config_path: str | Path, cores: int = 2, extra: list[str] | None = None) -> int:
    """Run the pipeline with Snakemake or DVC under one MLflow parent run.

    Snakemake opens the parent run itself (``onstart`` in the Snakefile); for DVC this function
    writes the config's dvc.yaml, opens the parent run and exports its id to the stage processes.
    """
    extra = [a for a in (extra or []) if a != "--"]
    if engine == "snakemake":
        # targets first: --configfile swallows every word after it
        cmd = [sys.executable, "-m", "snakemake", *extra, "--cores", str(cores), "--configfile", str(config_path)]
        return subprocess.call(cmd, env=interpreter_env())
    cfg, name = write_dvc_yaml(config_path)
    dvc = [str(Path(sys.executable).parent / "dvc"), "repro", *extra]
    if "--dry" in extra:  # prints the commands: nothing to check, nothing to track
        return subprocess.call(dvc, env=interpreter_env())
    unready = stages_mod.missing_perceptual_weights(cfg, [st for st in dvc_stages_to_run(cfg, extra) if not st.is_built()])
    if unready:
        print(f"preflight: {unready}", file=sys.stderr)
        return 1
    run_id = tracking.start_pipeline_run(cfg, name, "dvc")
    code = subprocess.call(dvc, env=interpreter_env({**os.environ, tracking.PIPELINE_ENV: run_id}))
    tracking.end_pipeline_run(cfg, run_id, ok=code == 0)
    if code == 0:
        stages_mod.update_current_links(cfg)
    return code
