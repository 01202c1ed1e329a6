"""Restorer folders on the Hugging Face Hub: load one by repository id, push one with a model card.

A Hub repository holds exactly the folder that :meth:`OneStepRestorer.save_pretrained_dir` (or
StableSR's) writes — ``restorer.json``, ``vae/``, ``unet/``, ``scheduler/``... in diffusers'
per-component layout — plus a ``README.md`` model card (:func:`model_card`) whose YAML header
says what it is (``library_name: tvt``, the method, the restorer class) and whose body carries
``restorer.json``, the components, the training stage and its key, and the evaluation's
metrics when there is one. No ``model_index.json``: that file tells the Hub and diffusers
"this is a diffusers pipeline", which a restorer folder is not; ``restorer.json`` is our index.

Loading (:func:`restorer_folder`) goes through ``huggingface_hub.snapshot_download``, so the
Hub cache is shared with every other library and ``revision`` pins a branch, tag or commit.
Every file is then checked against its content address (:func:`verify_snapshot`): the cache
names each blob by the Hub's sha256 (LFS files) or git blob id (small files), so a file that
was damaged or replaced after the download is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path

from tvt.models.restorer import RESTORER_CONFIG

#: a Hub model id, "owner/name" (huggingface_hub.utils.validate_repo_id's characters)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_SHA256, _GIT_SHA1 = re.compile(r"^[0-9a-f]{64}$"), re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20


class HubError(RuntimeError):
    """A restorer could not be fetched from (or sent to) the Hub; the message says what to do."""


def is_repo_id(source: str | Path) -> bool:
    """Whether ``source`` is a Hub model id rather than a local path (a path that exists always wins)."""
    text = str(source)
    return not Path(text).exists() and bool(REPO_ID.match(text)) and ".." not in text


def restorer_folder(source: str | Path, *, revision: str | None = None) -> Path:
    """The local folder of a restorer: ``source`` itself when it is a folder, else the snapshot of the
    Hub repository ``source`` ("owner/name") at ``revision`` (default: main), downloaded into the
    Hugging Face cache if it is not there yet, then verified."""
    if not is_repo_id(source):
        if revision is not None:
            raise ValueError(f"revision {revision!r} given for the local folder {source}: revisions select Hub commits")
        return Path(source)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{source}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(str(source), revision=revision, library_name="tvt"))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise HubError(
            f"{where}: no local folder of that name, and no such model repository on the Hugging Face Hub "
            "(or it is private or gated: log in with `hf auth login` or set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{where}: the repository has no such branch, tag or commit") from exc
    except LocalEntryNotFoundError as exc:
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(
            f"{where}: no local folder of that name, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and {reason}. Fetch it once "
            f"where the Hub is reachable (`hf download {source}`{' --revision ' + revision if revision else ''}, "
            "or any `tvt sr --weights` of it) and copy that cache folder here (HF_HUB_CACHE points at it), "
            "or pass a local restorer folder"
        ) from exc
    verify_snapshot(folder)
    if not (folder / RESTORER_CONFIG).is_file():
        raise HubError(f"{where} holds no {RESTORER_CONFIG}: it is not a restorer folder (push one with `tvt push`)")
    return folder


def _file_digest(path: Path, git_blob: bool) -> str:
    digest = hashlib.sha1() if git_blob else hashlib.sha256()
    if git_blob:
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_snapshot(folder: Path) -> None:
    """Check every file of a cached snapshot against the name of its blob, the Hub's own hash of it
    (sha256 for LFS files, the git blob id for the small ones); :class:`HubError` names a file that
    differs or cannot be checked (a cache written without symlinks)."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        blob = path.resolve()
        name = blob.name if path.is_symlink() and blob.parent.name == "blobs" else ""
        if _SHA256.match(name):
            actual = _file_digest(blob, git_blob=False)
        elif _GIT_SHA1.match(name):
            actual = _file_digest(blob, git_blob=True)
        else:
            raise HubError(
                f"{path}: not a link to a content-addressed blob of the Hugging Face cache, so its hash "
                "cannot be checked (a cache written without symlinks?); download it again"
            )
        if actual != name:
            raise HubError(
                f"{path} does not match the Hub's hash of it ({name}, got {actual}): the cached file was "
                f"damaged or replaced; delete {blob} and load again to download it anew"
            )


# ---- pushing ------------------------------------------------------------------------------------


def _components(folder: Path) -> dict[str, str]:
    """Component folder -> its class, from the configs the folder holds (diffusers' ``_class_name``)."""
    found = {}
    for config in sorted(folder.glob("*/*config.json")):
        doc = json.loads(config.read_text())
        if "_class_name" in doc:
            found[config.parent.name] = doc["_class_name"]
    return found


def store_origin(folder: Path) -> tuple[str, str] | None:
    """(stage, key) when ``folder`` is a pipeline output, ``…/store/<stage>/<key>`` (links resolved)."""
    real = Path(folder).resolve()
    if real.parent.parent.name == "store" and re.fullmatch(r"[0-9a-f]{16}", real.name):
        return real.parent.name, real.name
    return None


def find_metrics(folder: Path, root: Path = Path()) -> tuple[Path, str, dict] | None:
    """The newest evaluation (``results/store/evaluate/*/metrics.json`` under ``root``) that scored this
    very folder: (its metrics.json, the method's name there, the method's scores per subset)."""
    real = Path(folder).resolve()
    candidates = sorted(
        (root / "results" / "store" / "evaluate").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for path in candidates:
        summary = json.loads(path.read_text())
        for method, restorer in (summary.get("restorers") or {}).items():
            if (root / restorer).resolve() == real:
                return path, method, {s: rows[method] for s, rows in summary["subsets"].items() if method in rows}
    return None


def model_card(folder: Path, repo_id: str, metrics: tuple[Path, str, Mapping] | None = None) -> str:
    """The README.md of a pushed restorer: YAML metadata for the Hub, then what a reader needs to use it."""
    folder = Path(folder)
    config = json.loads((folder / RESTORER_CONFIG).read_text())
    method, class_name = config.get("method", "unknown"), config.get("class", "OneStepRestorer")
    origin = store_origin(folder)
    header = [
        "---",
        "library_name: tvt",
        "pipeline_tag: image-to-image",
        "tags:",
        "- super-resolution",
        "- real-world-image-super-resolution",
        f"- {method}",
        f"- {class_name}",
        "---",
        "",
    ]
    body = [
        f"# {method} restorer ({class_name})",
        "",
        "A real-world ×{scale} super-resolution restorer saved by the TVT reproducibility pipeline "
        "(`restorer.json` + diffusers-layout components).".format(scale=config.get("scale", "?")),
        "",
        "```bash",
        f"tvt sr photos/ -o restored/ --weights {repo_id}",
        "```",
        "",
        "```python",
        "from tvt.models.saved import load_restorer",
        "",
        f'restorer = load_restorer("{repo_id}")  # LR (B, 3, h, w) in [0, 1] -> SR in [0, 1]',
        "```",
        "",
        "## Configuration",
        "",
        f"`{RESTORER_CONFIG}`:",
        "",
        "```json",
        json.dumps(config, indent=2),
        "```",
        "",
        "| component | class |",
        "|---|---|",
        *(f"| `{name}/` | `{cls}` |" for name, cls in _components(folder).items()),
        "",
        "## Training",
        "",
    ]
    if origin:
        stage, key = origin
        body += [
            (
                f"Trained by the pipeline stage `{stage}`, output key `{key}` (the hash of the stage's "
                "configuration section, its inputs' keys and its code: `tvt where "
                f"{stage} --config CONFIG` prints the folder a configuration trains)."
            ),
            "",
        ]
    else:
        body += ["Not a pipeline store folder: its training configuration key is unknown.", ""]
    if metrics:
        path, name, subsets = metrics
        keys = list(dict.fromkeys(k for values in subsets.values() for k in values))
        body += [
            "## Evaluation",
            "",
            (f"Scored as `{name}` by the evaluation `{path.parent.name}` (mean over the test images of each subset):"),
            "",
            "| subset | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
            *(f"| {s} | " + " | ".join(_number(v.get(k)) for k in keys) + " |" for s, v in subsets.items()),
            "",
        ]
    return "\n".join(header + body)


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def push_restorer(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    metrics_root: Path = Path(),
    message: str | None = None,
    api=None,
) -> str:
    """Upload a restorer folder to ``repo_id`` (created if missing) in one commit, with its model card;
    return the commit's URL. The card is sent from memory and the weights from their files, so the
    (content-addressed, never edited) folder is neither copied nor changed."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / RESTORER_CONFIG).is_file():
        raise HubError(f"{folder} is not a restorer folder: {RESTORER_CONFIG} is missing")
    if not REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub model id (owner/name)")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    card = model_card(folder, repo_id, find_metrics(folder, metrics_root))
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
        for p in files
        if p.relative_to(folder).as_posix() != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    origin = store_origin(folder)
    api = api or HfApi(library_name="tvt")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=message
        or (
            f"Upload {json.loads((folder / RESTORER_CONFIG).read_text()).get('method', 'restorer')} restorer"
            + (f" ({origin[0]} {origin[1]})" if origin else "")
        ),
        repo_type="model",
    )
    return getattr(info, "commit_url", str(info))
