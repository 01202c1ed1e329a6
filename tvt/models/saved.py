"""Load any saved restorer folder: the class is named in its ``restorer.json``.

One-step restorers (TVT, OSEDiff, ablations) predate the ``class`` key and are the default;
StableSR's folder says ``"class": "StableSRRestorer"``. Evaluation and ``tvt sr`` load through
here, so a new restorer kind needs one line in :data:`CLASSES`, not a change in every caller.
A Hub model id ("owner/name") loads like a folder (:mod:`tvt.models.hub`).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from tvt.models.restorer import RESTORER_CONFIG

CLASSES = ("OneStepRestorer", "StableSRRestorer")


def restorer_class_name(path: str | Path) -> str:
    config_file = Path(path) / RESTORER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved restorer: {RESTORER_CONFIG} is missing")
    name = json.loads(config_file.read_text()).get("class", "OneStepRestorer")
    if name not in CLASSES:
        raise ValueError(f"{config_file}: unknown restorer class {name!r}; known: {', '.join(CLASSES)}")
    return name


def load_restorer(path: str | Path, *, revision: str | None = None, **options: object) -> nn.Module:
    """The restorer saved in ``path``, a folder or a Hub model id ("owner/name", at ``revision``);
    ``options`` override its stored settings."""
    from tvt.models.hub import restorer_folder

    path = restorer_folder(path, revision=revision)
    if restorer_class_name(path) == "StableSRRestorer":
        from tvt.models.stablesr_restorer import StableSRRestorer

        return StableSRRestorer.from_pretrained_dir(path, **options)
    from tvt.models.restorer import OneStepRestorer

    return OneStepRestorer.from_pretrained_dir(path, **options)


#: diffusers' name for it
from_pretrained = load_restorer
