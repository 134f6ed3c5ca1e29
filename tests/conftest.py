"""Shared fixtures: paths to the shared VOC sample and a small generated toy dataset."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC_SAMPLE = SHARED / "data" / "voc2007_sample" / "VOCdevkit" / "VOC2007"


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
