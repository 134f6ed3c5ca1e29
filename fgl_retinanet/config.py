"""Typed configuration: dataclass defaults, YAML files with `_base_`, dotted overrides.

    fgl-train --config configs/voc2012_fgl.yaml train.epochs=1 loss.gamma=1

This module must stay free of TensorFlow so that a bad config fails in a fraction of a second,
before the framework starts.
"""

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# The repository root, so that relative paths in configs work from any working directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


@dataclass
class ToyDataConfig:
    num_train: int = 480  # images in the generated train split
    num_val: int = 120  # images in the generated val split
    image_size: int = 128  # side of the square generated images, in pixels
    seed: int = 0  # generator seed: the same seed gives byte-identical files


@dataclass
class DataConfig:
    dataset: str = "voc"  # "voc": an existing VOC-layout directory; "toy": generated shapes
    root: str = ""  # directory holding Annotations/, JPEGImages/, ImageSets/Main/
    train_split: str = "train"  # ImageSets/Main/<name>.txt used for training
    val_split: str = "val"  # ImageSets/Main/<name>.txt evaluated every epoch
    classes: list[str] = field(default_factory=lambda: list(VOC_CLASSES))  # label order
    image_min_side: int = 800  # resize so the short side is this long (keras-retinanet default)
    image_max_side: int = 1333  # ...unless the long side would exceed this
    flip_chance: float = 0.5  # probability of a horizontal flip per training image
    difficult: str = "include"  # difficult objects in training: "include" or "ignore"
    unknown_classes: str = "error"  # objects named outside `classes`: "error" or "skip"
    bad_boxes: str = "error"  # objects without a usable box inside the image: "error" or "skip"
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)  # used when dataset == "toy"


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet50/101/152 (keras-retinanet) or "tiny" (CPU demo)
    weights: str = "imagenet"  # "imagenet" (downloaded once, cached), "none", or a .h5 path
    freeze_backbone: bool = False  # keep backbone weights fixed
    head_width: int = 256  # channels of the FPN levels and of the class/box heads
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # P3..P7
    prior_probability: float = 0.01  # initial foreground probability of the class head


@dataclass
class LossConfig:
    name: str = "focal"  # a name from fgl_retinanet.losses.LOSSES: focal, focal_gradient
    alpha: float = 0.25  # weight of the positive class
    gamma: float = 2.0  # focusing exponent
    from_logits: bool = True  # compute from logits (stable); False reproduces keras-retinanet
    regression_sigma: float = 3.0  # smooth-L1 transition point (keras-retinanet default)


@dataclass
class TrainConfig:
    epochs: int = 15  # passes over the training list
    batch_size: int = 1  # images per step per process
    base_lr: float = 1e-5  # Adam learning rate (keras-retinanet default)
    clipnorm: float = 0.001  # gradient clipping by norm (keras-retinanet default)
    lr_scaling: str = "linear"  # Horovod: "linear" multiplies base_lr by the process count
    warmup_epochs: float = 0.0  # ramp the LR linearly from base_lr to the scaled LR
    reduce_lr_patience: int = 2  # epochs without loss improvement before LR x factor; 0: off
    reduce_lr_factor: float = 0.1  # (keras-retinanet's ReduceLROnPlateau defaults: 2, 0.1)
    early_stopping_patience: int = 0  # epochs without mAP improvement before stopping; 0: off
    seed: int = 0  # seeds data order, augmentation and weight initialisation
    output_dir: str = "runs"  # parent directory of run directories
    run_name: str = ""  # run directory name; empty derives it from the config file name
    workers: int = 1  # keras data-loading threads; 0 loads batches in the training thread
    tensorboard: bool = True  # write TensorBoard event files
    threads: int = 0  # TensorFlow intra-op threads; 0 lets TensorFlow decide
    pin_cpus: bool = True  # Horovod on CPU: bind each local rank to its own share of cores
    horovod_cycle_ms: float = 0.0  # HOROVOD_CYCLE_TIME; 0: environment, else 20 on CPU-only hosts
    diagnostics_every: int = 0  # gradient diagnostics every K steps (diagnostics.csv); 0: off
    mixed_precision: bool = False  # experimental: float16 compute, float32 losses, loss scaling
    jit_compile: bool = False  # experimental: XLA-compile the train step (model.compile)


@dataclass
class EvalConfig:
    every_epoch: bool = True  # compute validation mAP after each epoch
    score_threshold: float = 0.05  # drop detections below this score
    max_detections: int = 100  # keep at most this many detections per image
    nms_threshold: float = 0.5  # IoU for non-maximum suppression
    iou_threshold: float = 0.5  # a detection matches when IoU > this (VOC devkit rule)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.dataset": ("voc", "toy"),
    "data.difficult": ("include", "ignore"),
    "data.unknown_classes": ("error", "skip"),
    "data.bad_boxes": ("error", "skip"),
    "train.lr_scaling": ("none", "linear"),
}


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Builds a Config from defaults, an optional YAML file and dotted overrides.

    Args:
        path: YAML file; it may name a `_base_` file (relative to itself) to inherit from.
        overrides: strings like `train.epochs=1`; values are parsed as YAML scalars.

    Raises:
        ConfigError: unknown key, wrong type, bad choice, or unreadable file.
    """
    # Merge the chain of YAML files, then the command line on top.
    raw = _load_yaml_chain(Path(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        # Parsed later, against the field's type, so "007" stays text for a string field.
        _set_dotted(raw, key.strip(), _RawOverride(value.strip()))

    # Build typed dataclasses; every unknown key or wrong type stops here.
    config = _build(Config, raw, prefix="")
    _check_choices(config)

    # Default run name: the config file's stem, so demo_fgl.yaml writes runs/.../demo_fgl.
    if not config.train.run_name:
        config.train.run_name = Path(path).stem if path else "run"
    return config


def validate_paths(config: Config) -> None:
    """Checks that the dataset and weights a config names exist, without importing TF."""
    if config.data.dataset == "voc":
        root = resolve_path(config.data.root)
        if not config.data.root:
            raise ConfigError("data.root is empty: set it to a VOC directory (VOCdevkit/VOC2012)")
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            if not (root / sub).is_dir():
                raise ConfigError(f"data.root {root} has no {sub}/ (expected a VOC directory)")
        for split in (config.data.train_split, config.data.val_split):
            if not (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
                raise ConfigError(f"split list {root}/ImageSets/Main/{split}.txt not found")
    weights = config.model.weights
    if weights not in ("imagenet", "none") and not resolve_path(weights).is_file():
        raise ConfigError(f"model.weights file {weights} not found (or use 'imagenet'/'none')")
    if weights == "imagenet" and config.model.backbone == "tiny":
        raise ConfigError("model.weights=imagenet is not available for the tiny backbone")


def resolve_path(path: str) -> Path:
    """Expands ~; a relative path stays relative to the working directory."""
    return Path(os.path.expanduser(path))


def find_config(path) -> Path:
    """A config file by path, or by its path inside the project (configs/demo_fgl.yaml)."""
    candidate = resolve_path(str(path))
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return PROJECT_ROOT / candidate


def save_config(config: Config, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """Reads a YAML file that must hold a mapping (empty: {}); any problem is one ConfigError.

    Args:
        path: the file.
        what: what the file is, for the message, e.g. "config" or "experiment".
    """
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping at the top level")
    return data


def _load_yaml_chain(path: Path, seen: tuple = ()) -> dict:
    path = find_config(path)
    if path.resolve() in seen:
        raise ConfigError(f"config {path} inherits from itself through _base_")
    data = read_yaml_mapping(path, "config")

    # A child states only its differences from the base.
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _load_yaml_chain(path.parent / base, seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known in {prefix.rstrip('.') or 'top'}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


class _RawOverride(str):
    """The text of a command-line value, before it is interpreted for its field."""


def _coerce(hint, value, key: str):
    if isinstance(value, _RawOverride):
        if hint is str:
            return str(value)
        try:
            value = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {key}={value} is not a valid value") from None
    # YAML reads 1e-4 (no dot) as text; a float field accepts it when it parses as a number.
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key} must be float, got {value!r}") from None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    # YAML gives ints for "1"; a float field accepts them, but no field accepts bools as numbers.
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _check_choices(config: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    positive = {
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "data.image_min_side": config.data.image_min_side,
        "data.image_max_side": config.data.image_max_side,
        "model.head_width": config.model.head_width,
        "eval.max_detections": config.eval.max_detections,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not 0.0 <= config.data.flip_chance <= 1.0:
        raise ConfigError(f"data.flip_chance must be in [0, 1], got {config.data.flip_chance}")
    nonnegative = {
        "train.warmup_epochs": config.train.warmup_epochs,
        "train.reduce_lr_patience": config.train.reduce_lr_patience,
        "train.early_stopping_patience": config.train.early_stopping_patience,
        "train.diagnostics_every": config.train.diagnostics_every,
        "train.horovod_cycle_ms": config.train.horovod_cycle_ms,
    }
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0.0 < config.train.reduce_lr_factor <= 1.0:
        raise ConfigError(
            f"train.reduce_lr_factor must be in (0, 1], got {config.train.reduce_lr_factor}"
        )
    if config.loss.gamma < 0:
        raise ConfigError(f"loss.gamma must be >= 0, got {config.loss.gamma}")
    if len(config.model.anchor_sizes) != 5:
        raise ConfigError("model.anchor_sizes needs 5 sizes, one per pyramid level P3..P7")
    if len(set(config.data.classes)) != len(config.data.classes) or not config.data.classes:
        raise ConfigError("data.classes must be a non-empty list of distinct names")
