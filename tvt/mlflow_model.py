"""A restorer folder as an MLflow model: a pyfunc whose one artifact is the folder, registered by name.

The evaluation stage logs every restorer it scores (:func:`log_restorer_model`) inside that
method's comparison run, with its metrics attached to the model, and registers it as
``tvt-<mode>-<method>``: the MLflow UI then lists each restorer under *Models*, one version per
evaluated training output, and compares versions by their metrics.

The model is MLflow's "models from code" (``mlflow_model_code.py`` is its code, no pickle): loading
it runs :class:`RestorerModel.load_context`, which loads the folder with
:func:`tvt.models.saved.load_restorer`, so ``mlflow.pyfunc.load_model(uri).predict(lr)`` restores
exactly like ``tvt sr``'s network. It needs this package installed where it is loaded.

Prompts travel as the model's ``model_config`` (:data:`PROMPT_KEYS`): the tagger the evaluation
scored the restorer with (``evaluate.tagger``) and the files it read (SD's text encoder, RAM / DAPE
weights), so the registered model predicts what the tables scored. The paths are the logging
machine's; elsewhere override them at load time, as MLflow allows for every logged key:
``mlflow.pyfunc.load_model(uri, model_config={"tagger": "none"})`` (the stored null prompt) or
``model_config={"text_encoder": ..., "ram_weights": ..., "dape_weights": ...}``. A model logged
without a tagger follows the folder's own recipe (``restorer.json`` ``prompt``), as ``tvt sr`` does.

``predict`` takes LR images (N, h, w, 3) float32 in [0, 1] (the signature, which MLflow enforces)
and returns SR (N, scale·h, scale·w, 3) float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np

#: the model's code file: MLflow copies it into the model and runs it on load
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")
ARTIFACT = "restorer"
#: what the model code imports besides this package (pinned to what logged it)
REQUIREMENTS = ("torch", "diffusers", "peft", "transformers", "safetensors", "numpy", "mlflow")
#: the ``model_config`` keys of a logged restorer: every one is logged (MLflow overrides only logged keys)
PROMPT_KEYS = ("tagger", "text_encoder", "ram_weights", "dape_weights")


def prompt_config(tagger: str | None = None, text_encoder: str | Path | None = None,
                  ram_weights: str | Path | None = None, dape_weights: str | Path | None = None) -> dict:
    """A logged model's ``model_config``: how it prompts (``tagger`` None: the folder's recipe), and with what files."""
    paths = {"text_encoder": text_encoder, "ram_weights": ram_weights, "dape_weights": dape_weights}
    return {"tagger": tagger, **{key: None if path is None else str(path) for key, path in paths.items()}}


def registered_name(mode: str, method: str) -> str:
    return f"tvt-{mode}-{method}"


class RestorerModel(mlflow.pyfunc.PythonModel):
    """LR images -> SR images through the restorer folder in the model's artifacts."""

    def load_context(self, context) -> None:
        import torch

        from tvt.models.saved import load_restorer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        folder = Path(context.artifacts[ARTIFACT])
        self.restorer = load_restorer(folder).to(self.device).eval()
        self._prompt(folder, {**prompt_config(), **(context.model_config or {})})

    def _prompt(self, folder: Path, config: Mapping) -> None:
        """Condition the restorer as ``config`` says (module docstring); errors say which key to override."""
        from tvt.models.prompts import chosen_tagger, tag_restorer

        tagger = chosen_tagger(self.restorer, config["tagger"])
        if tagger == "none":
            return
        try:
            tag_restorer(self.restorer, tagger, text_encoder=config["text_encoder"] or folder,
                         ram_weights=config["ram_weights"], dape_weights=config["dape_weights"])
        except (TypeError, FileNotFoundError, RuntimeError) as exc:
            raise RuntimeError(
                f"this restorer model prompts with {tagger} tags, which cannot run here: {exc} — load it with "
                "model_config={'text_encoder': ..., 'ram_weights': ..., 'dape_weights': ...} naming the files on "
                "this machine, or model_config={'tagger': 'none'} for its stored null prompt") from exc

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected LR images (N, h, w, 3), got shape {images.shape}")
        lr = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            sr = self.restorer(lr.to(self.device))
        return sr.float().permute(0, 2, 3, 1).cpu().numpy()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = (-1, -1, -1, 3)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
    )


def log_restorer_model(folder: Path, mode: str, method: str, metrics: Mapping[str, float] | None = None,
                       prompt: Mapping | None = None):
    """Log ``folder`` as a pyfunc model in the active run, register it as ``tvt-<mode>-<method>`` and
    attach ``metrics`` to it; return MLflow's ModelInfo. The folder is stored once, in the model.
    ``prompt``: :func:`prompt_config` keys (absent ones: the folder's own recipe)."""
    unknown = set(prompt or {}) - set(PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompt: unknown keys {sorted(unknown)}; known: {', '.join(PROMPT_KEYS)}")
    info = mlflow.pyfunc.log_model(
        name=f"restorer-{method}",
        python_model=str(MODEL_CODE),
        artifacts={ARTIFACT: str(folder)},
        signature=signature(),
        registered_model_name=registered_name(mode, method),
        pip_requirements=[f"{name}=={version(name)}" for name in REQUIREMENTS],
        tags={"tvt.method": method, "tvt.restorer": str(folder)},
        model_config=prompt_config(**(prompt or {})),
    )
    if metrics:
        mlflow.log_metrics(dict(metrics), model_id=info.model_id)
    return info
