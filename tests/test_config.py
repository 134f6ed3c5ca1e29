"""Tests for fgl_retinanet.config: typed defaults, `_base_` chains, dotted overrides, checks.

Nothing here may import TensorFlow: the point of the config module is to fail fast without it.
"""

import dataclasses
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import yaml

from fgl_retinanet.cli import train_main
from fgl_retinanet.config import (
    VOC_CLASSES,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    ToyDataConfig,
    TrainConfig,
    load_config,
    save_config,
    validate_paths,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

# Modules whose presence after a config error would mean the framework started anyway.
HEAVY_MODULES = ("tensorflow", "keras", "keras_retinanet")


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(first: Config, second: Config) -> list[str]:
    a, b = flatten(first.to_dict()), flatten(second.to_dict())
    assert a.keys() == b.keys()
    return sorted(key for key in a if a[key] != b[key])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path=None, overrides=()) -> str:
    """The message of the ConfigError that load_config must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(str(path) if path else None, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "a config error is reported as one line"
    return message


def make_voc_tree(root: Path, splits=("train", "val")) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("000001\n")
    return root


# Defaults


def test_defaults_are_typed_dataclasses():
    config = Config()
    sections = {
        "data": DataConfig,
        "model": ModelConfig,
        "loss": LossConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }
    assert [f.name for f in dataclasses.fields(Config)] == list(sections)
    for name, cls in sections.items():
        assert type(getattr(config, name)) is cls
    assert type(config.data.toy) is ToyDataConfig

    # Every default has the type its annotation promises (a float default written as 1 is a bug).
    for section in [*(getattr(config, name) for name in sections), config.data.toy]:
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            if typing.get_origin(hints[f.name]) is list:
                (item_type,) = typing.get_args(hints[f.name])
                assert all(type(item) is item_type for item in value), f.name
            else:
                assert type(value) is hints[f.name], f"{type(section).__name__}.{f.name}"


def test_default_values():
    config = Config()
    assert config.data.dataset == "voc"
    assert config.data.classes == list(VOC_CLASSES)
    assert len(config.data.classes) == 20
    assert config.model.backbone == "resnet50"
    assert config.model.anchor_sizes == [32, 64, 128, 256, 512]
    assert config.loss.name == "focal"
    assert config.loss.alpha == 0.25
    assert config.loss.gamma == 2.0
    assert config.train.epochs == 15
    assert config.train.base_lr == 1e-5
    assert config.eval.iou_threshold == 0.5

    # Mutable defaults come from factories: two configs never share a list.
    other = Config()
    other.data.classes.append("extra")
    other.model.anchor_sizes[0] = 1
    assert config.data.classes == list(VOC_CLASSES)
    assert config.model.anchor_sizes[0] == 32


def test_load_config_without_file_is_the_defaults():
    config = load_config()
    assert differing_keys(config, Config()) == ["train.run_name"]
    assert config.train.run_name == "run"


# YAML files and _base_


def test_voc2012_fgl_inherits_through_the_base_chain():
    config = load_config("configs/voc2012_fgl.yaml")
    assert config.loss.name == "focal_gradient"  # voc2012_fgl.yaml
    assert config.data.root == "data/VOCdevkit/VOC2012"  # voc2012_focal.yaml
    assert config.loss.gamma == 2.0 and type(config.loss.gamma) is float  # base.yaml
    assert config.train.epochs == 15
    assert config.train.base_lr == 1e-5
    assert config.model.backbone == "resnet50"
    assert config.model.weights == "imagenet"
    assert config.data.train_split == "train" and config.data.val_split == "val"
    assert config.train.run_name == "voc2012_fgl"


@pytest.mark.parametrize(
    "focal, fgl", [("voc2012_focal", "voc2012_fgl"), ("demo_focal", "demo_fgl")]
)
def test_paired_configs_differ_only_in_the_loss(focal, fgl):
    focal_config = load_config(CONFIG_DIR / f"{focal}.yaml")
    fgl_config = load_config(CONFIG_DIR / f"{fgl}.yaml")

    # run_name derives from the file stem; everything else must match but the loss.
    assert differing_keys(focal_config, fgl_config) == ["loss.name", "train.run_name"]
    assert (focal_config.loss.name, fgl_config.loss.name) == ("focal", "focal_gradient")
    assert (focal_config.train.run_name, fgl_config.train.run_name) == (focal, fgl)


def test_demo_config_values():
    config = load_config(CONFIG_DIR / "demo_fgl.yaml")
    assert config.data.dataset == "toy"
    assert config.data.classes == ["circle", "square", "triangle"]
    assert config.data.image_min_side == 128 and config.data.image_max_side == 128
    assert config.model.backbone == "tiny"
    assert config.model.weights == "none"
    assert config.model.head_width == 64
    assert config.model.anchor_sizes == [16, 32, 64, 128, 256]
    assert config.train.epochs == 16
    assert config.train.batch_size == 8
    assert config.train.base_lr == 1e-3
    assert config.train.output_dir == "runs/demo"

    # Inherited from base.yaml through demo_base.yaml.
    assert config.loss.alpha == 0.25
    assert config.loss.gamma == 2.0
    assert config.data.flip_chance == 0.5


def test_relative_config_path_works_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/voc2012_fgl.yaml")
    assert config.loss.name == "focal_gradient"
    assert config.train.epochs == 15


def test_base_is_relative_to_the_child_and_merged_deeply(tmp_path, monkeypatch):
    write(
        tmp_path / "base.yaml",
        "data:\n  root: /data/voc\n  classes: [a, b, c]\ntrain:\n  epochs: 7\n  seed: 3\n",
    )
    child = write(
        tmp_path / "experiments" / "child.yaml",
        "_base_: ../base.yaml\ndata:\n  classes: [d]\ntrain:\n  epochs: 2\n",
    )
    monkeypatch.chdir(tmp_path / "experiments")
    config = load_config(child)

    # Siblings of overridden keys survive; a list in the child replaces the base list.
    assert config.data.root == "/data/voc"
    assert config.data.classes == ["d"]
    assert config.train.epochs == 2
    assert config.train.seed == 3
    assert config.train.run_name == "child"


def test_empty_yaml_file_gives_defaults(tmp_path):
    config = load_config(write(tmp_path / "empty.yaml", "# nothing but a comment\n"))
    assert differing_keys(config, Config()) == ["train.run_name"]
    assert config.train.run_name == "empty"


# Dotted overrides


def test_overrides_are_parsed_to_the_field_types():
    base = load_config(CONFIG_DIR / "voc2012_fgl.yaml")
    config = load_config(CONFIG_DIR / "voc2012_fgl.yaml", ["train.epochs=1", "loss.gamma=1"])
    assert config.train.epochs == 1 and type(config.train.epochs) is int
    assert config.loss.gamma == 1.0 and type(config.loss.gamma) is float
    assert differing_keys(base, config) == ["loss.gamma", "train.epochs"]


def test_list_override():
    config = load_config(CONFIG_DIR / "voc2012_fgl.yaml", ["model.anchor_sizes=[8,16,32,64,128]"])
    assert config.model.anchor_sizes == [8, 16, 32, 64, 128]
    assert all(type(size) is int for size in config.model.anchor_sizes)


def test_override_kinds():
    config = load_config(
        CONFIG_DIR / "demo_fgl.yaml",
        [
            "train.epochs=3",
            "train.epochs=4",
            "model.freeze_backbone=true",
            "data.root=/tmp/somewhere",
            "data.toy.seed=5",
            "data.classes=[cat, dog]",
            " train.run_name = mine",
        ],
    )
    assert config.train.epochs == 4  # the last override wins
    assert config.model.freeze_backbone is True
    assert config.data.root == "/tmp/somewhere"
    assert config.data.toy.seed == 5
    assert config.data.classes == ["cat", "dog"]
    assert config.train.run_name == "mine"


# Errors: every one is a ConfigError with one line that names the culprit


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train:\n  epoch: 3\n", "train.epoch"),
        ("trian:\n  epochs: 3\n", "trian"),
        ("data:\n  toy:\n    sise: 64\n", "data.toy.sise"),
    ],
)
def test_unknown_key_in_yaml(tmp_path, yaml_text, key):
    # An absolute _base_ path, so the child inherits the real base.yaml from a tmp directory.
    text = f"_base_: {CONFIG_DIR / 'base.yaml'}\n{yaml_text}"
    message = config_error(write(tmp_path / "bad.yaml", text))
    assert f"unknown config key {key} " in message


def test_unknown_key_in_a_base_file(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  depth: 50\n")
    message = config_error(write(tmp_path / "child.yaml", "_base_: base.yaml\n"))
    assert "model.depth" in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),
        ("trian.epochs=3", "trian"),
        ("optimizer=adam", "optimizer"),
        ("data.toy.sise=64", "data.toy.sise"),
    ],
)
def test_unknown_key_in_override(override, key):
    message = config_error(CONFIG_DIR / "voc2012_fgl.yaml", [override])
    assert f"unknown config key {key} " in message


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.epochs=", "train.epochs"),
        ("loss.gamma=true", "loss.gamma"),
        ("loss.gamma=fast", "loss.gamma"),
        ("model.freeze_backbone=1", "model.freeze_backbone"),
        ("model.anchor_sizes=32", "model.anchor_sizes"),
        ("model.anchor_sizes=[8,16,32,64,big]", "model.anchor_sizes[4]"),
        ("train=5", "train"),
        ("train.epochs.max=5", "train.epochs"),
    ],
)
def test_wrong_type_in_override(override, key):
    message = config_error(CONFIG_DIR / "voc2012_fgl.yaml", [override])
    assert message.startswith(key) or f" {key}" in message


def test_wrong_type_in_yaml(tmp_path):
    message = config_error(write(tmp_path / "bad.yaml", "train:\n  epochs: 1.5\n"))
    assert message == "train.epochs must be int, got 1.5"


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("data.difficult=maybe", "data.difficult", "include, ignore"),
        ("data.dataset=coco", "data.dataset", "voc, toy"),
        ("data.unknown_classes=drop", "data.unknown_classes", "error, skip"),
    ],
)
def test_bad_choice(override, key, choices):
    message = config_error(CONFIG_DIR / "voc2012_fgl.yaml", [override])
    assert message.startswith(f"{key} must be one of {choices}")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-1", "train.batch_size"),
        ("loss.gamma=-0.5", "loss.gamma"),
        ("data.flip_chance=1.5", "data.flip_chance"),
        ("model.anchor_sizes=[8,16,32,64]", "model.anchor_sizes"),
        ("data.classes=[cat, cat]", "data.classes"),
        ("data.classes=[]", "data.classes"),
    ],
)
def test_out_of_range_values(override, key):
    assert config_error(CONFIG_DIR / "voc2012_fgl.yaml", [override]).startswith(key)


@pytest.mark.parametrize("override", ["train.epochs", "=3", "train.epochs 3"])
def test_malformed_override(override):
    message = config_error(CONFIG_DIR / "voc2012_fgl.yaml", [override])
    assert repr(override) in message
    assert "key.sub=value" in message


def test_base_cycle(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\ntrain:\n  epochs: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    assert "inherits from itself" in config_error(tmp_path / "a.yaml")

    write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    assert "inherits from itself" in config_error(tmp_path / "self.yaml")


def test_missing_config_file(tmp_path):
    message = config_error(tmp_path / "absent.yaml")
    assert message.startswith("cannot read config") and "absent.yaml" in message


def test_missing_base_file(tmp_path):
    message = config_error(write(tmp_path / "child.yaml", "_base_: nowhere.yaml\n"))
    assert message.startswith("cannot read config") and "nowhere.yaml" in message


def test_invalid_yaml(tmp_path):
    message = config_error(write(tmp_path / "broken.yaml", "train:\n  epochs: [1, 2\n"))
    assert "broken.yaml is not valid YAML" in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    message = config_error(write(tmp_path / "list.yaml", "- train\n- epochs\n"))
    assert "must be a mapping at the top level" in message


# Regressions: numbers in exponent form, override text kept for string fields, bad YAML


def test_float_override_in_exponent_notation():
    assert load_config(None, ["train.base_lr=1e-4"]).train.base_lr == 1e-4


def test_float_in_exponent_notation_in_yaml(tmp_path):
    config = load_config(write(tmp_path / "lr.yaml", "train:\n  base_lr: 1e-4\n"))
    assert config.train.base_lr == 1e-4


@pytest.mark.parametrize("text", ["20240101_1", "007", "1.10", "*latest", "[a, b]"])
def test_string_override_keeps_its_text(text):
    assert load_config(None, [f"train.run_name={text}"]).train.run_name == text


@pytest.mark.parametrize("override", ["model.anchor_sizes=[8,16", "train.epochs=*latest"])
def test_malformed_override_value(override):
    message = config_error(None, [override])
    assert override.split("=")[0] in message


# validate_paths


def test_voc_without_root():
    config = load_config(CONFIG_DIR / "base.yaml")
    with pytest.raises(ConfigError, match="data.root is empty"):
        validate_paths(config)


def test_voc_root_missing(tmp_path):
    root = tmp_path / "VOC2012"
    config = load_config(CONFIG_DIR / "voc2012_fgl.yaml", [f"data.root={root}"])
    with pytest.raises(ConfigError, match="has no Annotations/") as info:
        validate_paths(config)
    assert str(root) in str(info.value)


def test_voc_split_file_missing(tmp_path):
    root = make_voc_tree(tmp_path / "VOC2012", splits=("train",))
    config = load_config(CONFIG_DIR / "voc2012_fgl.yaml", [f"data.root={root}"])
    with pytest.raises(ConfigError, match="val.txt not found"):
        validate_paths(config)

    # The split names come from the config, not from a fixed list.
    config = load_config(
        CONFIG_DIR / "voc2012_fgl.yaml", [f"data.root={root}", "data.val_split=train"]
    )
    validate_paths(config)


def test_complete_voc_tree_passes(tmp_path):
    root = make_voc_tree(tmp_path / "VOC2012")
    config = load_config(CONFIG_DIR / "voc2012_fgl.yaml", [f"data.root={root}"])
    assert validate_paths(config) is None


def test_toy_dataset_needs_no_root():
    config = load_config(CONFIG_DIR / "demo_fgl.yaml")
    assert config.data.root == ""
    assert validate_paths(config) is None


def test_weights_file(tmp_path):
    weights = tmp_path / "snapshot.h5"
    config = load_config(CONFIG_DIR / "demo_fgl.yaml", [f"model.weights={weights}"])
    with pytest.raises(ConfigError, match="snapshot.h5 not found"):
        validate_paths(config)

    weights.write_bytes(b"not really HDF5, but present")
    validate_paths(config)


def test_imagenet_weights_with_tiny_backbone():
    config = load_config(CONFIG_DIR / "demo_fgl.yaml", ["model.weights=imagenet"])
    with pytest.raises(ConfigError, match="tiny backbone"):
        validate_paths(config)


# The fgl-train entry point


def test_cli_unknown_key_is_one_line(capsys):
    code = train_main(["--config", str(CONFIG_DIR / "demo_fgl.yaml"), "train.nonsense=1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fgl-train: config error: unknown config key train.nonsense ")


def test_cli_without_config(capsys):
    assert train_main([]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["fgl-train: config error: give --config FILE (or --resume RUN_DIR)"]


def test_cli_bad_path_is_a_config_error(tmp_path, capsys):
    code = train_main(
        ["--config", str(CONFIG_DIR / "voc2012_fgl.yaml"), f"data.root={tmp_path / 'absent'}"]
    )
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fgl-train: config error: data.root ")


def test_cli_config_error_exits_before_tensorflow(tmp_path):
    script = (
        "import sys\n"
        "from fgl_retinanet.cli import train_main\n"
        f"code = train_main(['--config', {str(CONFIG_DIR / 'demo_fgl.yaml')!r}, 'loss.gama=1'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})\n"
        "assert 'tensorflow' not in sys.modules, heavy\n"
        "print(heavy)\n"
        "sys.exit(code)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - started

    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == "[]"
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fgl-train: config error: unknown config key loss.gama ")
    assert seconds < 10


# save_config


@pytest.mark.parametrize("name", ["voc2012_fgl", "demo_focal"])
def test_save_config_round_trip(tmp_path, name):
    config = load_config(
        CONFIG_DIR / f"{name}.yaml",
        [
            "train.epochs=3",
            "train.base_lr=0.00025",
            "model.anchor_sizes=[8,16,32,64,128]",
            "data.toy.num_train=12",
            "train.run_name=resumed",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)

    # The file is plain YAML with one mapping per section, readable without our code.
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["data", "model", "loss", "train", "eval"]
    assert saved["train"]["epochs"] == 3

    loaded = load_config(path)
    assert loaded.to_dict() == config.to_dict()
    assert type(loaded.train.base_lr) is float
    assert loaded.train.run_name == "resumed"


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    # One line naming the directory, before TensorFlow starts, exit code 2.
    assert train_main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"fgl-train: config error: --resume {tmp_path} is not a run directory "
        "(no config.yaml there)"
    )
