"""Restorers that travel through the Hugging Face Hub, offline: a local folder laid out exactly like
the Hub cache (``models--owner--name/{blobs,snapshots,refs}``, blobs named by their hashes) stands in
for the Hub, so the real ``snapshot_download`` resolves it; pushing runs with the two network calls
of ``HfApi`` intercepted."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants
from PIL import Image
from test_sr import photo, run_sr, save_tiny_restorer

from tvt import cli
from tvt.models import hub
from tvt.models.saved import from_pretrained, load_restorer

REPO = "tvt-test/tiny-tvt"


def _blob_name(data: bytes, lfs: bool) -> str:
    """The Hub's name of a file's blob: sha256 for LFS files, the git blob id for the others."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def add_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, ref: str | None = "main") -> Path:
    """Lay ``folder`` into ``cache`` as huggingface_hub does after downloading ``repo_id`` at ``commit``."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = storage / "blobs" / _blob_name(data, lfs=path.suffix == ".safetensors")
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * len(link.relative_to(storage).parts[1:])) / "blobs" / blob.name)
    if ref:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_restorer(tmp_path_factory.mktemp("hub") / "tvt")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache with the Hub unreachable (HF_HUB_OFFLINE), as on a compute node."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _lr() -> torch.Tensor:
    return torch.from_numpy(photo(16, 12).copy()).permute(2, 0, 1)[None].float() / 255


def test_a_hub_id_loads_the_cached_snapshot_like_the_folder(saved, offline_cache):
    snapshot = add_snapshot(offline_cache, REPO, saved, "a" * 40)
    restorer = load_restorer(REPO)
    assert restorer.method == "tvt"
    with torch.no_grad():
        assert torch.equal(restorer(_lr()), load_restorer(saved)(_lr()))
    assert hub.restorer_folder(REPO) == snapshot
    assert from_pretrained is load_restorer


def test_revision_selects_a_commit(saved, offline_cache, tmp_path):
    add_snapshot(offline_cache, REPO, saved, "a" * 40)
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    config = json.loads((other / "restorer.json").read_text())
    (other / "restorer.json").write_text(json.dumps({**config, "color_fix": "wavelet"}))
    add_snapshot(offline_cache, REPO, other, "b" * 40, ref=None)
    assert load_restorer(REPO).color_fix == config["color_fix"] == "adain"
    assert load_restorer(REPO, revision="b" * 40).color_fix == "wavelet"


def test_tvt_sr_restores_from_a_hub_id(saved, offline_cache, tmp_path, capsys):
    add_snapshot(offline_cache, REPO, saved, "a" * 40)
    Image.fromarray(photo(16, 12)).save(tmp_path / "in.png")
    for name, weights in (("hub", REPO), ("folder", saved)):
        code, _, err = run_sr(capsys, tmp_path / "in.png", "-o", tmp_path / name, "--weights", weights)
        assert code == 0, err
    hub_out, folder_out = (np.asarray(Image.open(tmp_path / n / "in.png")) for n in ("hub", "folder"))
    assert hub_out.shape == (48, 64, 3) and np.array_equal(hub_out, folder_out)


def test_offline_without_the_snapshot_says_what_to_do(offline_cache, tmp_path, capsys):
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1 is set") as info:
        load_restorer("tvt-test/not-cached")
    assert "hf download tvt-test/not-cached" in str(info.value) and str(offline_cache) in str(info.value)
    Image.fromarray(photo(16, 12)).save(tmp_path / "in.png")
    code, _, err = run_sr(capsys, tmp_path / "in.png", "-o", tmp_path / "out", "--weights", "tvt-test/not-cached")
    assert code == 2 and "not in the Hugging Face cache" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_sr(capsys, tmp_path / "in.png", "-o", tmp_path / "out", "--revision", "main")
    assert code == 2 and "--revision selects a commit of a Hub repository" in err


def test_a_damaged_cached_file_is_refused(saved, offline_cache):
    snapshot = add_snapshot(offline_cache, REPO, saved, "a" * 40)
    weights = (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(hub.HubError, match=r"unet/diffusion_pytorch_model.safetensors does not match the Hub's hash"):
        load_restorer(REPO)


def test_a_local_path_wins_over_a_hub_id(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved, tmp_path / "owner" / "name")
    assert not hub.is_repo_id("owner/name") and hub.is_repo_id("owner/other")
    assert hub.restorer_folder("owner/name") == Path("owner/name")
    assert not hub.is_repo_id("../x") and not hub.is_repo_id("a/b/c")


# ---- push ---------------------------------------------------------------------------------------


def test_push_sends_the_folder_and_a_model_card_in_one_commit(saved, tmp_path, monkeypatch, capsys):
    key = "0123456789abcdef"
    folder = tmp_path / "resources" / "store" / "isr_tvt" / key
    shutil.copytree(saved, folder)
    evaluation = tmp_path / "results" / "store" / "evaluate" / "fedcba9876543210"
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text(
        json.dumps(
            {
                "restorers": {"tvt": f"resources/store/isr_tvt/{key}"},
                "subsets": {"all": {"tvt": {"n": 4, "psnr_y": 23.456789}, "bicubic": {"n": 4, "psnr_y": 22.0}}},
            }
        )
    )
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        sent = {
            op.path_in_repo: (
                op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes) else Path(op.path_or_fileobj).read_bytes()
            )
            for op in operations
        }
        calls.append(("create_commit", repo_id, kwargs, sent))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/c0ffee"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["push", f"resources/store/isr_tvt/{key}", REPO, "--private"]) == 0

    assert capsys.readouterr().out.strip().endswith(f"to https://huggingface.co/{REPO}/commit/c0ffee")
    assert calls[0] == ("create_repo", REPO, {"private": True, "exist_ok": True, "repo_type": "model"})
    ((_, repo_id, kwargs, sent),) = calls[1:]
    assert repo_id == REPO and kwargs == {
        "commit_message": f"Upload tvt restorer (isr_tvt {key})",
        "repo_type": "model",
    }
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    card = sent.pop("README.md").decode()
    assert sent == files  # every file, byte for byte, nothing else
    assert card.startswith("---\nlibrary_name: tvt\npipeline_tag: image-to-image\n")
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == json.loads(files["restorer.json"])
    assert f"`isr_tvt`, output key `{key}`" in card and "| `unet/` | `CEUNet` |" in card
    assert "| all | 4 | 23.46 |" in card and "22.0" not in card  # this restorer's row only
    assert f'load_restorer("{REPO}")' in card and f"--weights {REPO}" in card


def test_push_refuses_what_is_not_a_restorer(tmp_path):
    with pytest.raises(hub.HubError, match="restorer.json is missing"):
        hub.push_restorer(tmp_path, REPO)
