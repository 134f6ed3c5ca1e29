"""fgl-evaluate: one inference pass, every metric, re-scoring without a model."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fgl_retinanet import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalrun")
    code = cli.train_main(
        ["--config", "configs/demo_focal.yaml", "data.toy.num_train=24", "data.toy.num_val=8",
         "train.epochs=2", f"data.root={base / 'data'}", f"train.output_dir={base}"]
    )  # fmt: skip
    assert code == 0
    return base / "demo_focal"


def test_evaluate_a_run_reproduces_the_training_evaluation(trained_run, capsys):
    out = trained_run / "eval_val"
    assert cli.evaluate_main([str(trained_run)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    trained = json.loads((trained_run / "results.json").read_text())
    # Same weights, same split, same inference path: the same numbers as the last epoch.
    assert results["mAP"] == pytest.approx(trained["mAP"], abs=1e-9)
    assert results["mAP_11point"] == pytest.approx(trained["mAP_11point"], abs=1e-9)
    assert 0.0 <= results["coco_AP"] <= results["coco_AP50"] <= 1.0
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == ["circle", "square", "triangle"]
    assert sum(int(row["gt"]) for row in rows) == sum(c["gt"] for c in results["counts"].values())
    # One pasteable line of the means, also in the Markdown file.
    line = f"demo_focal,{results['mAP']:.3f},{results['mAP_11point']:.3f}"
    assert line in printed and line in (out / "results.md").read_text()
    assert "AP [.5:.95] (COCO)" in (out / "results.md").read_text()


def test_rescoring_saved_detections_needs_no_model(trained_run, tmp_path):
    if not (trained_run / "eval_val" / "detections.json").is_file():
        assert cli.evaluate_main([str(trained_run)]) == 0
    # A separate process proves TensorFlow is never imported on this path.
    script = (
        "import sys; from fgl_retinanet import cli; "
        f"code = cli.evaluate_main(['--detections', '{trained_run}/eval_val/detections.json', "
        f"'--out', '{tmp_path}']); "
        "assert 'tensorflow' not in sys.modules; sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((trained_run / "eval_val" / "results.json").read_text())
    assert again["mAP"] == first["mAP"] and again["coco_AP"] == first["coco_AP"]


def test_bad_inputs_fail_with_one_line(trained_run, tmp_path, capsys):
    assert cli.evaluate_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.evaluate_main([]) == 2
    # Detections of another split cannot be scored against this one.
    if not (trained_run / "eval_val" / "detections.json").is_file():
        assert cli.evaluate_main([str(trained_run)]) == 0
    code = cli.evaluate_main(
        ["--detections", str(trained_run / "eval_val" / "detections.json"), "--split", "train",
         "--out", str(tmp_path / "x")]
    )  # fmt: skip
    assert code == 1
    assert "8 detection images are not in split train" in capsys.readouterr().err
