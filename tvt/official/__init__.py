"""``tvt import``: the authors' released weights as ordinary restorer folders (docs/official-weights.md).

One module per release format — :mod:`tvt.official.tvt`, :mod:`tvt.official.osediff`,
:mod:`tvt.official.stablesr` — on two shared helpers: :mod:`tvt.official.checkpoint` (safe
loading, key accounting, clear errors) and :mod:`tvt.official.lora` (peft LoRA folded into
plain weights). Each writes a folder that :func:`tvt.models.saved.load_restorer` (``tvt sr
--weights``, the evaluation) loads, plus ``import_report.json``: which source files (sha256), how
many keys each had, how many were consumed, and which were ignored and why.

This module stays light (no torch) so that ``tvt --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "convert the authors' released TVT / OSEDiff / StableSR weights into restorer folders"
FORMATS = ("tvt", "osediff", "stablesr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--sd",
        type=Path,
        required=True,
        help="SD 2.1-base snapshot folder (`tvt where prior --config config/paper.yaml`: unet/, vae/, scheduler/, "
        "prompt_embeds.safetensors)",
    )
    common.add_argument("--out", type=Path, required=True, help="restorer folder to write")
    common.add_argument(
        "--size",
        choices=("paper", "mini"),
        default="paper",
        help="architecture of the parts the files do not describe (VAE-D4, StableSR's encoder): "
        "the released paper size, or this project's mini size (tests, demos)",
    )
    p = sub.add_parser("tvt", parents=[common], help="Joyies/TVT: vae.ckpt + TVTUNet/ + model_TVT.pkl")
    p.add_argument("--vae-ckpt", type=Path, required=True, help="ckp/vae.ckpt (Lightning, keys 'vaeDe4.*')")
    p.add_argument("--unet-dir", type=Path, required=True, help="ckp/TVTUNet (holds unet/config.json + weights)")
    p.add_argument("--pkl", type=Path, required=True, help="ckp/model_TVT.pkl (LoRA adapters, trained ends)")
    p = sub.add_parser("osediff", parents=[common], help="cswry/OSEDiff: osediff.pkl")
    p.add_argument("--pkl", type=Path, required=True, help="preset/models/osediff.pkl")
    p = sub.add_parser("stablesr", parents=[common], help="IceClear/StableSR: diffusion + CFW checkpoints")
    p.add_argument("--ckpt", type=Path, required=True, help="stablesr_000117.ckpt or stablesr_turbo.ckpt")
    p.add_argument("--cfw-ckpt", type=Path, required=True, help="vqgan_cfw_00011.ckpt")
    p.add_argument("--steps", type=int, default=200, help="sampling steps stored with the restorer (paper: 200)")
    p.add_argument("--w", type=float, default=0.5, help="CFW weight stored with the restorer (paper: 0.5)")


def run_import(fmt: str, sources: dict[str, Path], sd_dir: Path, out_dir: Path, **options) -> tuple[Path, dict]:
    """Convert one release; writes the restorer folder and its ``import_report.json``."""
    from tvt.data.download import sha256_of
    from tvt.official.checkpoint import write_report

    if fmt == "tvt":
        from tvt.official.tvt import import_tvt as convert
    elif fmt == "osediff":
        from tvt.official.osediff import import_osediff as convert
    elif fmt == "stablesr":
        from tvt.official.stablesr import import_stablesr as convert
    else:
        raise ValueError(f"unknown release format {fmt!r}; known: {', '.join(FORMATS)}")
    out_dir, report = convert(**sources, sd_dir=sd_dir, out_dir=out_dir, **options)
    report["files"] = {
        name: {"path": str(path), "sha256": sha256_of(path)} for name, path in sources.items() if Path(path).is_file()
    }
    report["prompt"] = "null (the SD snapshot's empty-prompt embedding)"
    write_report(out_dir, report)
    return out_dir, report


#: where a stage's downloaded release lands when its URL's basename is not the name the importer needs
_STAGE_FILENAMES = {"unet_config": "config.json"}


def run_official_stage(name: str, cfg, run, opts, sd_dir: Path, out_dir: Path, downloads: Path) -> None:
    """The ``official_<name>`` pipeline stage: fetch the pinned files into ``downloads``, import them
    on the SD snapshot ``sd_dir`` into ``out_dir``, log the key accounting."""
    from pathlib import PurePosixPath

    from tvt.data.download import fetch_dataset

    section = cfg["official"][name]
    names = {
        key: spec.get("filename") or _STAGE_FILENAMES.get(key) or PurePosixPath(spec["url"]).name
        for key, spec in section["files"].items()
    }
    archives = [{**spec, "filename": names[key], "extract": False} for key, spec in section["files"].items()]
    folder = fetch_dataset(
        f"official_{name}", {"archives": archives}, downloads, trust_new_hashes=opts.get("trust_new_hashes", False)
    )
    files = {key: folder / filename for key, filename in names.items()}
    if name == "tvt":  # TVTUNet's config.json and weights sit in the release folder itself
        sources = {"vae_ckpt": files["vae_ckpt"], "unet_dir": folder, "pkl": files["pkl"]}
    else:
        sources = files
    options = {k: section[k] for k in ("steps", "w") if k in section}
    out_dir, report = run_import(name, sources, sd_dir, out_dir, **options)
    run.log_metrics(
        {
            "keys": sum(p["keys"] for p in report["sources"]),
            "keys_consumed": sum(p["consumed"] for p in report["sources"]),
        }
    )
    run.log_artifact(out_dir / "import_report.json", "import")


def main(args: argparse.Namespace) -> int:
    from tvt.official.checkpoint import OfficialFormatError

    names = {"tvt": ("vae_ckpt", "unet_dir", "pkl"), "osediff": ("pkl",), "stablesr": ("ckpt", "cfw_ckpt")}
    sources = {name: getattr(args, name) for name in names[args.format]}
    options = {"steps": args.steps, "w": args.w} if args.format == "stablesr" else {}
    if args.size == "mini":
        from tvt.models.sd_configs import MINI_VAE_D4, STABLESR_ENCODER_MINI

        options.update(
            {"tvt": {"vae_config": MINI_VAE_D4}, "stablesr": {"encoder_config": STABLESR_ENCODER_MINI}}.get(
                args.format, {}
            )
        )
    try:
        out_dir, report = run_import(args.format, sources, args.sd, args.out, **options)
    except (OfficialFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for part in report["sources"]:
        ignored = sum(entry["keys"] for entry in part["ignored"])
        print(f"{part['source']}: {part['keys']} keys, {part['consumed']} converted or verified, {ignored} ignored")
    print(f"wrote {out_dir} (see import_report.json)")
    return 0
