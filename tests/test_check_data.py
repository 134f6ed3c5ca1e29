"""fgl-check-data through check_data_main(), and the same report written by training."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from fgl_retinanet import cli

PROJECT = Path(__file__).resolve().parents[1]


def write_tree(root: Path, annotations: dict, split: str = "trainval") -> Path:
    """A VOC tree of 64 x 48 images; annotations maps id -> list of (name, box) or None."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image = np.full((48, 64, 3), 90, dtype=np.uint8)
    for image_id, objects in annotations.items():
        assert cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        if objects is None:
            continue
        body = "".join(
            f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, (x1, y1, x2, y2) in objects
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>64</width><height>48</height></size>{body}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")
    return root


def messy_tree(root: Path) -> Path:
    # 30 unknown names (more than the log shows), a border box, a missing annotation.
    annotations = {f"u{i:02d}": [("persn", (1, 1, 9, 9))] for i in range(30)}
    annotations["ok"] = [("dog", (1, 1, 9, 9)), ("cat", (50, 5, 70, 20))]
    annotations["noxml"] = None
    return write_tree(root, annotations)


def test_error_policy_exits_non_zero_and_reports_everything(tmp_path, capsys):
    root = messy_tree(tmp_path / "voc")
    out = tmp_path / "report.json"
    code = cli.check_data_main(["--root", str(root), "--split", "trainval", "--json", str(out)])
    assert code == 1
    printed = capsys.readouterr().out
    # Every problem is printed (no "... and N more"), then the verdict.
    skipped = "skipped object: object 0 named 'persn'"
    assert all(f"u{i:02d}.xml: {skipped}" in printed for i in range(30))
    assert "noxml.xml: listed in the split but missing" in printed
    assert "1 box crossing the border clipped" in printed
    assert "training cannot proceed" in printed and "more (all in the JSON" not in printed
    assert "31 images, 2 objects" in printed

    report = json.loads(out.read_text())
    assert report["can_train"] is False
    split = report["splits"]["trainval"]
    assert split["unknown_names"] == {"persn": 30}
    assert split["per_class"]["dog"] == 1 and split["per_class"]["cat"] == 1
    assert len(split["problems"]) == 31 and split["missing_annotations"] == 1
    assert len(split["errors"]) == 1 and "data.unknown_classes=skip" in split["errors"][0]


def test_skip_policy_lets_training_proceed(tmp_path, capsys):
    root = messy_tree(tmp_path / "voc")
    code = cli.check_data_main(["--root", str(root), "--split", "trainval",
                                "data.unknown_classes=skip"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.rstrip().endswith("1 split(s) checked: training can proceed")


def test_usage_errors(tmp_path, capsys):
    root = write_tree(tmp_path / "voc", {"a": [("dog", (1, 1, 9, 9))]})
    assert cli.check_data_main(["--split", "trainval"]) == 2
    assert "give --root" in capsys.readouterr().err
    assert cli.check_data_main(["--root", str(root), "--split", "nope"]) == 2
    assert "nope.txt not found" in capsys.readouterr().err
    assert cli.check_data_main(["--root", str(root), "--split", "trainval", "data.nokey=1"]) == 2


def test_check_data_does_not_import_tensorflow(tmp_path):
    root = write_tree(tmp_path / "voc", {"a": [("dog", (1, 1, 9, 9))]})
    script = (
        "import sys\n"
        "from fgl_retinanet.cli import check_data_main\n"
        f"code = check_data_main(['--root', {str(root)!r}, '--split', 'trainval'])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "print(code, sorted(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []"


def test_training_writes_the_same_report(tmp_path, capsys):
    # The run directory's data_report.json equals what fgl-check-data writes for its splits.
    settings = [
        f"data.root={tmp_path / 'data'}", "data.toy.num_train=8", "data.toy.num_val=4",
        "train.epochs=1", "train.batch_size=8", "train.tensorboard=false",
        f"train.output_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    config = str(PROJECT / "configs" / "demo_focal.yaml")
    assert cli.train_main(["--config", config, *settings]) == 0
    written = json.loads((tmp_path / "runs" / "demo_focal" / "data_report.json").read_text())
    checked = tmp_path / "checked.json"
    assert cli.check_data_main(["--config", config, "--json", str(checked), *settings]) == 0
    assert written == json.loads(checked.read_text())
    assert set(written["splits"]) == {"train", "val"}
    assert written["splits"]["train"]["images"] == 8 and written["can_train"] is True
    # ...and the log carries the same summary.
    log = (tmp_path / "runs" / "demo_focal" / "log.txt").read_text()
    assert "/train: 8 images" in log and "/val: 4 images" in log
    assert "objects per class: circle" in log and "training can proceed" in log
