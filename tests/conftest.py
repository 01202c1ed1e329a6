"""Fixtures shared across the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs ``-n $(CORES)``) the workers share the machine's cores:
    each worker's torch gets its share of them, and OpenMP threads sleep instead of spinning while
    they wait, so that a worker's stage subprocesses and the other worker do not oversubscribe the
    cores with spinning threads (tens of times slower, see :func:`_torch_threads_kept`)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when OpenMP starts: here and in every subprocess
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(workers)))


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """Library code sets torch's thread count for a process (``runner._use_granted_cpus``,
    ``InferenceOptions.threads``); run in-process by a test, that setting would outlive it, and every
    later test would run on all cores of a shared machine, where oversubscribed OpenMP threads spin
    (tens of times slower). Each test gets back the count it started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def perceptual_weights(tmp_path_factory) -> Path:
    """The offline LPIPS/DISTS weight cache the stages find (``$TVT_WEIGHTS_DIR``, else the checkout's
    ``.tvt-cache/weights``, which `make test` fills first) when it verifies, else fetched once into a
    temporary folder."""
    from tvt.weights import default_weights_dir, fetch_perceptual_weights, verify_cache

    configured = default_weights_dir()
    if verify_cache(configured):
        return configured
    dest = tmp_path_factory.mktemp("tvt-weights")
    fetch_perceptual_weights(dest)
    return dest


@pytest.fixture(scope="session")
def ci_pipeline(tmp_path_factory, perceptual_weights):
    """The CI-config pipeline, trained once per (xdist) worker: the end-to-end workflow test and the ablation test both
    start from it (the keyed store reruns nothing that exists), each on a fresh copy."""
    from workflow_support import TrainedPipeline

    return TrainedPipeline(tmp_path_factory.mktemp("ci-pipeline"), perceptual_weights)


@pytest.fixture(scope="module")
def random_lpips():
    """LPIPS as the training stages load it, with a random AlexNet trunk (no download): the official
    architecture and linear heads, so the losses and metrics run their real code path."""
    from training_support import random_trunk_lpips

    from tvt.metrics import perceptual

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perceptual, "load_lpips", random_trunk_lpips)
        yield
