"""A restorer folder logged and registered as an MLflow pyfunc model restores exactly like the folder."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from test_sr import photo, save_tiny_restorer

from tvt.mlflow_model import log_restorer_model
from tvt.models.saved import load_restorer

# every test creates an MLflow store (SQLite + alembic migrations) and loads a logged model: seconds each
pytestmark = pytest.mark.slow


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("models", artifact_location=(tmp_path / "artifacts").as_uri())
    yield mlflow.MlflowClient(uri), experiment
    mlflow.set_tracking_uri(None)


def test_logged_model_predicts_what_the_folder_restores(tmp_path, tracking):
    client, experiment = tracking
    folder = save_tiny_restorer(tmp_path / "tvt")
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_restorer_model(folder, "mini", "tvt", metrics={"psnr_y": 21.5})

    versions = client.search_model_versions("name = 'tvt-mini-tvt'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]
    assert {m.key: m.value for m in client.get_logged_model(info.model_id).metrics} == {"psnr_y": 21.5}

    model = mlflow.pyfunc.load_model("models:/tvt-mini-tvt/1")
    lr = photo(16, 12).astype(np.float32) / 255
    sr = model.predict(lr[None])
    with torch.no_grad():
        expected = load_restorer(folder)(torch.from_numpy(lr).permute(2, 0, 1)[None])
    assert sr.shape == (1, 48, 64, 3) and sr.dtype == np.float32
    assert np.array_equal(sr[0], expected[0].permute(1, 2, 0).numpy())
    bicubic = (
        torch.nn.functional.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None], scale_factor=4, mode="bicubic")
        .clamp(0, 1)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert np.abs(sr[0] - bicubic).mean() > 1e-3  # the network ran, not an upsampler
    two = model.predict(np.stack([lr, lr[::-1]]))  # a batch restores each image as on its own
    assert np.abs(two[0] - sr[0]).max() < 1e-5 and np.abs(two[1] - sr[0]).max() > 0.1
    with pytest.raises(Exception, match="shape"):
        model.predict(lr[None, ..., :2])


def test_the_evaluation_registers_each_restorer_in_its_comparison_run(tmp_path, tracking):
    from tvt.evaluate import log_comparison_runs

    client, experiment = tracking
    folder = save_tiny_restorer(tmp_path / "tvt")
    summary = {
        "test_set": "mini-test",
        "complexity": {"tvt": {"steps": 1}},
        "subsets": {
            "all": {"bicubic": {"psnr_y": 20.0}, "tvt": {"psnr_y": 21.0}},
            "photo": {"bicubic": {"psnr_y": 19.0}, "tvt": {"psnr_y": 20.5}},
        },
    }
    with mlflow.start_run(experiment_id=experiment) as run:
        prompt = {"tagger": "dape", "text_encoder": "/sd", "ram_weights": "/ram.pth", "dape_weights": "/DAPE.pth"}
        assert log_comparison_runs(run.info, summary, "mini", {"tvt": folder}, {"tvt": prompt}) == 4
    (version,) = client.search_model_versions("name = 'tvt-mini-tvt'")
    assert mlflow.models.get_model_info("models:/tvt-mini-tvt/1").flavors["python_function"]["config"] == prompt
    source = client.get_run(version.run_id)
    assert source.info.run_name == "tvt · all" and source.data.metrics == {"psnr_y": 21.0, "steps": 1.0}
    assert source.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert client.search_registered_models() and [m.name for m in client.search_registered_models()] == ["tvt-mini-tvt"]


def test_a_logged_model_prompts_as_the_evaluation_scored_it(tmp_path, tracking):
    from training_support import save_tiny_text_encoder

    from tvt import evaluate as ev

    _, experiment = tracking
    folder = save_tiny_restorer(tmp_path / "tvt")
    save_tiny_text_encoder(tmp_path / "sd", hidden_size=8)
    cfg = {"degrade": {"scale": 4}, "isr": {"tvt": {}}, "evaluate": {"methods": ["tvt"], "tagger": {"tvt": "colour"}}}
    method = ev.build_method("tvt", cfg, model_dir=folder, text_encoder=tmp_path / "sd")
    assert method.model_prompt == {"tagger": "colour", "text_encoder": str(tmp_path / "sd"), "ram_weights": None,
                                   "dape_weights": None}
    with mlflow.start_run(experiment_id=experiment):
        log_restorer_model(folder, "mini", "tvt", prompt=method.model_prompt)

    lr = photo(16, 12).astype(np.float32) / 255
    x = torch.from_numpy(lr).permute(2, 0, 1)[None]
    with torch.no_grad():
        scored, null = method.restore(x, "p")[0].permute(1, 2, 0).numpy(), load_restorer(folder)(x)[0]
    tagged = mlflow.pyfunc.load_model("models:/tvt-mini-tvt/1").predict(lr[None])[0]
    assert np.array_equal(tagged, scored)  # what the table scored, tags and all
    untagged = mlflow.pyfunc.load_model("models:/tvt-mini-tvt/1", model_config={"tagger": "none"}).predict(lr[None])[0]
    assert np.array_equal(untagged, null.permute(1, 2, 0).numpy()) and np.abs(tagged - untagged).max() > 0
    with pytest.raises(RuntimeError, match=r"prompts with colour tags.*tokenizer/.*model_config=\{'tagger': 'none'\}"):
        mlflow.pyfunc.load_model("models:/tvt-mini-tvt/1", model_config={"text_encoder": str(tmp_path / "gone")})

    # logged without a prompt: the folder's own recipe, as `tvt sr` follows it
    config = json.loads((folder / "restorer.json").read_text())
    (folder / "restorer.json").write_text(json.dumps({**config, "prompt": {"tagger": "colour", "positive": "sharp"}}))
    with mlflow.start_run(experiment_id=experiment):
        log_restorer_model(folder, "mini", "tvt")
    with pytest.raises(RuntimeError, match="prompts with colour tags"):  # the folder holds no text encoder
        mlflow.pyfunc.load_model("models:/tvt-mini-tvt/2")
    with pytest.raises(ValueError, match="unknown keys.*'tagger_name'"):
        log_restorer_model(folder, "mini", "tvt", prompt={"tagger_name": "colour"})
