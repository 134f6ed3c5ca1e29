"""Shared fixtures: paths to the shared VOC sample and a small generated toy dataset."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from shared_paths import VOC_SAMPLE  # noqa: E402 - tests/ is on sys.path under pytest


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    if not VOC_SAMPLE.is_dir():
        pytest.skip(f"shared VOC sample not found at {VOC_SAMPLE} (CI always has ../shared)")
    return VOC_SAMPLE


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    from fgl_retinanet.data import generate_toy_dataset

    root = tmp_path_factory.mktemp("toy") / "toy"
    return generate_toy_dataset(root, num_train=24, num_val=8, image_size=128, seed=3)
