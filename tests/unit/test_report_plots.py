"""The report's charts: sizes, what they are of, and what they mark."""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.pipeline.report_plots import plot_confusion, plot_curves
from tests.unit.report_cases import NAMES, probs_of


def test_confusion_plot(tmp_path):
    png = tmp_path / "cm.png"
    cms = {"at the operating threshold": np.array([[5, 1], [0, 3]]), "argmax": np.eye(2, dtype=int)}
    assert plot_confusion(cms, NAMES, png) == png
    # two classes: 4-inch panels, two a rule side by side (+1 inch), one row a rule; 100 dpi
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (900, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary left


def test_curve_plot_is_of_the_named_class_not_the_last(tmp_path):
    y = np.array([0, 0, 1, 2, 1, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.5, 0.4, 0.1], [0.2, 0.1, 0.7]])
    p = np.vstack([p, [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]])
    got = plot_curves(y, p, ["a", "b", "c"], "a", 0.4, tmp_path / "curves.png")
    # a's positives .7 .4 against .5 .2 .1 .3: 7 of 8 pairs ranked right (c's would be 1.0)
    assert got["roc_auc"] == 0.875
    # ranking .7(P) .5(N) .4(P): precision 1 at recall 1/2, 2/3 at recall 1
    assert got["average_precision"] == 0.833333
    # a >= .4 flags .7 .4 (positives) and .5 (of 4 negatives)
    assert got["operating_point"] == {"fpr": 0.25, "recall": 1.0, "precision": 0.666667}
    assert got["title"] == (
        "positive class: a (one vs rest: b, c), test split, 2 of 6 positive; "
        "operating point a >= 0.4000"
    )
    with Image.open(tmp_path / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1100, 500)
    binary = plot_curves(
        np.array([0, 1, 1]), probs_of([0.2, 0.9, 0.6]), NAMES, "sensitive", 0.5, tmp_path / "b.png"
    )
    assert binary["title"].startswith("positive class: sensitive (vs safe), test split, 2 of 3")
    assert binary["roc_auc"] == 1.0
