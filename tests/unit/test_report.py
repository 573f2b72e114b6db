"""The report stage: metrics against hand-computed values, the operating point, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imgclf.config import Paths
from imgclf.params import Params, ParamsError, Report, validate
from imgclf.pipeline import report as rep

ROOT = Path(__file__).resolve().parents[2]

NAMES = ["safe", "sensitive"]


def probs_of(pos_scores: list[float]) -> np.ndarray:
    s = np.array(pos_scores)
    return np.stack([1 - s, s], axis=1)


def test_metrics_by_hand():
    # truth: 0 0 0 1 1; predicted (score >= .5): 0 1 0 1 0
    y = np.array([0, 0, 0, 1, 1])
    p = probs_of([0.1, 0.7, 0.2, 0.9, 0.4])
    m = rep.compute_metrics(y, p.argmax(1), p, NAMES, "sensitive")
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["safe"] == {
        "precision": pytest.approx(2 / 3, abs=1e-6),
        "recall": pytest.approx(2 / 3, abs=1e-6),
        "f1": pytest.approx(2 / 3, abs=1e-6),
        "support": 3,
    }
    assert m["per_class"]["sensitive"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["sensitive"]["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-6)
    # ROC AUC: pairs (pos, neg) ranked right: 0.9 beats all 3; 0.4 beats 0.1 and 0.2 -> 5/6
    assert m["roc_auc"] == pytest.approx(5 / 6, abs=1e-6)
    # AP: ranking .9(P) .7(N) .4(P) ... -> precision 1 at recall .5, 2/3 at recall 1
    assert m["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-6)
    assert m["n"] == 5


def test_metrics_with_an_absent_class_have_no_auc():
    p = probs_of([0.2, 0.6])
    m = rep.compute_metrics(np.array([0, 0]), p.argmax(1), p, NAMES, "sensitive")
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["accuracy"] == 0.5
    three = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])  # class c absent
    assert rep.auc_scores(np.array([0, 1]), three, ["a", "b", "c"], "c") == (None, None)


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = rep.compute_metrics(y, p.argmax(1), p, ["a", "b", "c"], "c")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    # one-vs-rest AUC by pairs: a 3/3; b: its positive (.87) beats .07, .07, ties .87 -> 2.5/3;
    # c: positives .87 and .07 against .07, .07 -> (2 + 2 * 0.5) / 4
    assert m["roc_auc"] == pytest.approx((1 + 2.5 / 3 + 0.75) / 3, abs=1e-6)


def test_threshold_for_recall_constructed_case():
    scores = np.array([0.9, 0.85, 0.8, 0.4, 0.3, 0.2])
    positive = np.array([1, 0, 1, 1, 1, 0], bool)  # positives: .9 .8 .4 .3
    assert rep.threshold_for_recall(scores, positive, 0.5) == pytest.approx(0.8)
    assert rep.threshold_for_recall(scores, positive, 0.75) == pytest.approx(0.4)
    assert rep.threshold_for_recall(scores, positive, 0.76) == pytest.approx(0.3)
    assert rep.threshold_for_recall(scores, positive, 1.0) == pytest.approx(0.3)
    at = rep.precision_recall_at(scores, positive, 0.8)
    assert at == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": 0.5}
    with pytest.raises(ValueError, match="target_recall"):
        rep.threshold_for_recall(scores, positive, 0.0)
    with pytest.raises(ValueError, match="no positive"):
        rep.threshold_for_recall(scores, np.zeros(6, bool), 0.9)


# 10 positives .95, .90, ..., .50 and 4 negatives: the closed forms below are by hand
POS10 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
SCORES10 = np.array([*POS10, 0.88, 0.62, 0.3, 0.2])
TRUTH10 = np.array([True] * 10 + [False] * 4)


def test_recall_lower_bound_closed_forms():
    # all hits: Beta(n, 1) has cdf x**n, so the bound is (1 - c) ** (1 / n)
    assert rep.recall_lower_bound(10, 10, 0.9) == pytest.approx(0.1**0.1, abs=1e-12)
    assert round(rep.recall_lower_bound(10, 10, 0.9), 6) == 0.794328  # as the JSON shows it
    assert rep.recall_lower_bound(3, 3, 0.9) == pytest.approx(0.1 ** (1 / 3), abs=1e-12)
    # 9 of 10: Beta(9, 2) has cdf 10 x**9 - 9 x**10, which is 1 - c at the bound
    lb = rep.recall_lower_bound(9, 10, 0.9)
    assert 10 * lb**9 - 9 * lb**10 == pytest.approx(0.1, abs=1e-9)
    assert round(lb, 6) == 0.663152
    # one hit: Beta(1, n) has cdf 1 - (1 - x)**n
    assert rep.recall_lower_bound(1, 4, 0.9) == pytest.approx(1 - 0.9**0.25, abs=1e-12)
    assert rep.recall_lower_bound(0, 5, 0.9) == 0.0
    with pytest.raises(ValueError, match="recall_confidence"):
        rep.recall_lower_bound(3, 3, 1.0)
    with pytest.raises(ValueError, match="hits"):
        rep.recall_lower_bound(4, 3, 0.9)


def test_positives_needed():
    # (1 - c) ** (1 / n) >= target  <=>  n >= log(1 - c) / log(target)
    assert rep.positives_needed(0.95, 0.9) == 45  # 44.89
    assert rep.positives_needed(0.6, 0.9) == 5  # 4.51
    assert rep.positives_needed(1.0, 0.9) is None


@pytest.mark.parametrize(
    ("target", "threshold", "hits", "bound", "met"),
    [
        # bounds at 90%: 8 of 10 -> 0.550396, 9 -> 0.663152, 10 -> 0.794328
        (0.55, 0.6, 8, 0.550396, True),
        (0.6, 0.55, 9, 0.663152, True),  # the old rule (point estimate) says 0.70
        (0.67, 0.5, 10, 0.794328, True),
        (0.7943, 0.5, 10, 0.794328, True),
        (0.8, 0.5, 10, 0.794328, False),  # not reachable with 10 positives: fall back
    ],
)
def test_confident_threshold_constructed_case(target, threshold, hits, bound, met):
    got = rep.confident_threshold(SCORES10, TRUTH10, target, 0.9)
    assert got == {
        "threshold": threshold,
        "rule": rep.BOUND_RULE if met else rep.FALLBACK_RULE,
        "bound_met": met,
        "hits": hits,
        "n_positive": 10,
        "recall": hits / 10,
        "recall_lower_bound": bound,
    }


def test_the_old_rule_stops_at_the_point_estimate():
    assert rep.threshold_for_recall(SCORES10, TRUTH10, 0.6) == pytest.approx(0.7)
    assert rep.confident_threshold(SCORES10, TRUTH10, 0.6, 0.5)["threshold"] == 0.65


def test_confident_threshold_with_tied_scores_counts_every_tie():
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.75, 0.1])
    truth = np.array([1, 1, 1, 1, 0, 0], bool)
    # 3 of 4 gives 0.320461 >= 0.3 (2 of 4: 0.142559); at 0.7 all 4 positives are flagged
    got = rep.confident_threshold(scores, truth, 0.3, 0.9)
    assert got["threshold"] == 0.7 and got["hits"] == 4 and got["recall"] == 1.0
    assert got["recall_lower_bound"] == 0.562341  # 0.1 ** (1 / 4), rounded


def test_too_few_positives_fall_back_to_the_lowest_positive_and_say_so():
    scores, truth = np.array([0.9, 0.4, 0.6, 0.3, 0.5]), np.array([1, 0, 1, 0, 1], bool)
    got = rep.confident_threshold(scores, truth, 0.95, 0.9)
    assert got == {
        "threshold": 0.5,
        "rule": rep.FALLBACK_RULE,
        "bound_met": False,
        "hits": 3,
        "n_positive": 3,
        "recall": 1.0,
        "recall_lower_bound": 0.464159,  # 0.1 ** (1 / 3)
    }
    with pytest.raises(ValueError, match="no positive"):
        rep.confident_threshold(scores, np.zeros(5, bool), 0.9, 0.9)
    with pytest.raises(ValueError, match="target_recall"):
        rep.confident_threshold(scores, truth, 0.0, 0.9)
    with pytest.raises(ValueError, match="recall_confidence"):
        rep.confident_threshold(scores, truth, 0.9, 0.0)


def test_the_threshold_is_rounded_down_so_it_still_flags_its_positive():
    # round(0.123456786, 8) is 0.12345679, above the score: serving would miss it
    got = rep.confident_threshold(np.array([0.123456786, 0.1]), np.array([1, 0], bool), 0.5, 0.5)
    assert got["threshold"] == 0.12345678 and got["hits"] == 1
    f32 = np.array([0.3, 0.2], np.float32)  # float32 0.3 is 0.300000011920...
    got = rep.confident_threshold(f32, np.array([1, 0], bool), 0.5, 0.5)
    assert got["threshold"] == 0.30000001 and (f32 >= got["threshold"]).tolist() == [True, False]


def test_operating_point_is_chosen_on_val_and_measured_on_test():
    test_s = np.array([0.95, 0.58, 0.52, 0.45, 0.9, 0.6, 0.1])
    test_p = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    op = rep.operating_point(SCORES10, TRUTH10, test_s, test_p, "sensitive", 0.6, 0.9)
    assert op == {
        "positive_class": "sensitive",
        "target_recall": 0.6,
        "recall_confidence": 0.9,
        "threshold": 0.55,
        "rule": rep.BOUND_RULE,
        "bound_met": True,
        # val: flagged the 9 positives >= .55 and the negatives .88, .62
        "val": {
            "precision": 0.818182,
            "recall": 0.9,
            "recall_lower_bound": 0.663152,
            "n_positive": 10,
        },
        # test: flagged .95 .58 (positives) and .9 .6 (negatives)
        "test": {"precision": 0.5, "recall": 0.5, "n_positive": 4},
        "expected": {"recall": 0.663152, "precision": 0.818182},
    }
    assert json.loads(json.dumps(op)) == op  # plain JSON types only
    line = rep.describe_operating_point(op)
    assert line.startswith("sensitive >= 0.55: val recall 0.9 (90% lower bound 0.663152 >= ")
    assert "test recall 0.5 precision 0.5 (4 positives)" in line
    few = rep.operating_point(SCORES10, TRUTH10, test_s, test_p, "sensitive", 0.95, 0.9)
    assert few["bound_met"] is False and few["threshold"] == 0.5
    assert few["expected"]["recall"] == 0.794328 and few["test"]["recall"] == 0.75
    assert "TARGET NOT VOUCHED FOR: only 10 val positives" in rep.describe_operating_point(few)
    assert "needs 45" in rep.describe_operating_point(few)


def test_recall_confidence_is_a_checked_param():
    good = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert validate(good, Params, "params.yaml").report.recall_confidence == 0.9
    for bad in (0.3, 1.0, "0.9"):
        report = {**good["report"], "recall_confidence": bad}
        with pytest.raises(ParamsError, match=r"params.yaml: report.recall_confidence: "):
            validate({**good, "report": report}, Params, "params.yaml")
    missing = {k: v for k, v in good["report"].items() if k != "recall_confidence"}
    with pytest.raises(ParamsError, match=r"report\.recall_confidence: missing"):
        validate({**good, "report": missing}, Params, "params.yaml")


def test_curve_rows():
    positive = np.array([0, 0, 1, 1], bool)
    roc, pr = rep.curve_rows(positive, np.array([0.1, 0.4, 0.35, 0.8]), "sensitive")
    # scores .8(P) .4(N) .35(P) .1(N): ROC (fpr, tpr) steps at each score from the top
    assert [(r["fpr"], r["tpr"], r["threshold"]) for r in roc] == [
        (0.0, 0.0, 1.0), (0.0, 0.5, 0.8), (0.5, 0.5, 0.4), (0.5, 1.0, 0.35), (1.0, 1.0, 0.1),
    ]  # fmt: skip
    # precision 1/2 at t=.1, 2/3 at .35, 1/2 at .4, 1 at .8 (lowest threshold first)
    assert [(r["recall"], r["precision"], r["threshold"]) for r in pr] == [
        (1.0, 0.5, 0.1), (1.0, 0.666667, 0.35), (0.5, 0.5, 0.4), (0.5, 1.0, 0.8),
    ]  # fmt: skip
    assert {r["positive_class"] for r in roc + pr} == {"sensitive"}
    assert list(roc[0]) == list(rep.ROC_FIELDS) and list(pr[0]) == list(rep.PR_FIELDS)
    bare, _ = rep.curve_rows(positive, np.array([0.1, 0.4, 0.35, 0.8]))
    assert list(bare[0]) == ["fpr", "tpr", "threshold"]


def test_confusion_plot(tmp_path):
    png = tmp_path / "cm.png"
    cms = {"at the operating threshold": np.array([[5, 1], [0, 3]]), "argmax": np.eye(2, dtype=int)}
    assert rep.plot_confusion(cms, NAMES, png) == png
    # two classes: 4-inch panels, two a rule side by side (+1 inch), one row a rule; 100 dpi
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (900, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary left


def test_curve_plot_is_of_the_named_class_not_the_last(tmp_path):
    y = np.array([0, 0, 1, 2, 1, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.5, 0.4, 0.1], [0.2, 0.1, 0.7]])
    p = np.vstack([p, [[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]])
    got = rep.plot_curves(y, p, ["a", "b", "c"], "a", 0.4, tmp_path / "curves.png")
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
    binary = rep.plot_curves(
        np.array([0, 1, 1]), probs_of([0.2, 0.9, 0.6]), NAMES, "sensitive", 0.5, tmp_path / "b.png"
    )
    assert binary["title"].startswith("positive class: sensitive (vs safe), test split, 2 of 3")
    assert binary["roc_auc"] == 1.0


COLORS = {"a.png": "white", "b.png": "red", "c.png": "blue", "d.png": "green", "e.png": "yellow"}


def test_mistakes_grid_shows_the_most_confident_errors_first(tmp_path):
    for name, color in COLORS.items():
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    paths = ["c.png", "b.png", "a.png", "d.png", "e.png", "f.png"]
    y_true = np.array([0, 1, 0, 1, 0, 1])
    y_pred = np.array([1, 0, 0, 0, 1, 1])  # e.png decided positive at a low threshold
    probs = probs_of([0.9, 0.1, 0.01, 0.4, 0.3, 0.8])
    out = tmp_path / "report" / "mistakes.png"
    rows = rep.mistakes_grid(
        paths, y_true, y_pred, probs, NAMES, out, 3, root=tmp_path, thumb=20, columns=2
    )
    # errors c (.9 for sensitive), b (.9 for safe), d (.6 for safe), e (.3): ties by path
    assert rows == [
        {"path": "b.png", "true": "sensitive", "predicted": "safe", "score": 0.9},
        {"path": "c.png", "true": "safe", "predicted": "sensitive", "score": 0.9},
        {"path": "d.png", "true": "sensitive", "predicted": "safe", "score": 0.6},
    ]
    assert list(rows[0]) == list(rep.MISTAKE_FIELDS)
    # 2 columns x 2 rows of cells 20 + 2 * 6 = 32 wide, 20 + 3 * 6 + 3 * 14 = 80 high,
    # under a 22 px header
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 22 + 160)
        rgb = img.convert("RGB")
        centre = 6 + 10  # padding + half a thumbnail
        assert rgb.getpixel((centre, 22 + centre)) == (255, 0, 0)  # b
        assert rgb.getpixel((32 + centre, 22 + centre)) == (0, 0, 255)  # c
        assert rgb.getpixel((centre, 22 + 80 + centre)) == (0, 128, 0)  # d
        assert rgb.getpixel((32 + centre, 22 + 80 + centre)) == (255, 255, 255)  # empty cell
    everything = rep.most_confident_errors(paths, y_true, y_pred, probs, NAMES, limit=10)
    assert [r["path"] for r in everything] == ["b.png", "c.png", "d.png", "e.png"]
    assert everything[-1]["score"] == 0.3


def test_mistakes_grid_without_errors_or_with_an_unreadable_image(tmp_path):
    y = np.array([0, 1])
    rows = rep.mistakes_grid(
        ["x.png", "y.png"], y, y, probs_of([0.1, 0.9]), NAMES, tmp_path / "none.png", thumb=20
    )
    assert rows == []
    with Image.open(tmp_path / "none.png") as img:
        assert img.size == (32, 22 + 80)
    rows = rep.mistakes_grid(
        ["gone.png"], np.array([1]), np.array([0]), probs_of([0.2]), NAMES,
        tmp_path / "grey.png", thumb=20,
    )  # fmt: skip
    assert rows == [{"path": "gone.png", "true": "sensitive", "predicted": "safe", "score": 0.8}]
    with Image.open(tmp_path / "grey.png") as img:
        assert img.convert("RGB").getpixel((16, 22 + 16)) == (160, 160, 160)


def test_mlflow_metric_names():
    p = probs_of([0.2, 0.7])
    m = rep.compute_metrics(np.array([0, 1]), p.argmax(1), p, NAMES, "sensitive")
    m["argmax"] = {"accuracy": 0.5, "per_class": {"safe": {"recall": 0.25, "f1": None}}}
    names = rep.mlflow_metrics(m)
    assert names["test_accuracy"] == 1.0 and names["test_sensitive_recall"] == 1.0
    assert names["test_argmax_accuracy"] == 0.5 and names["test_argmax_safe_recall"] == 0.25
    assert "test_argmax_safe_f1" not in names and "test_per_class" not in names


def test_decisions_at_the_threshold_and_otherwise_the_best_other_class():
    p = np.array([[0.5, 0.2, 0.3], [0.6, 0.1, 0.3], [0.1, 0.15, 0.75]])
    assert rep.decisions_at_threshold(p, 1, 0.15).tolist() == [1, 0, 1]
    assert rep.decisions_at_threshold(p, 2, 0.5).tolist() == [0, 0, 2]


@pytest.mark.parametrize(
    ("named", "counts", "expected"),
    [
        (
            None,
            {"safe": 900, "sensitive": 300},
            ("sensitive", "the rarest class (300 of 1200 training images)"),
        ),
        (
            None,
            {"cats": 40, "dogs": 12, "foxes": 12},
            ("foxes", "the rarest class (12 of 64 training images)"),
        ),
        ("safe", {"safe": 900, "sensitive": 300}, ("safe", "report.positive_class")),
    ],
)
def test_positive_class_defaults_to_the_rarest(named, counts, expected):
    assert rep.choose_positive(named, counts) == expected


def test_a_positive_class_the_candidate_lacks_is_a_clear_error():
    with pytest.raises(rep.StageError, match=r"report.positive_class 'nsfw' is not a class"):
        rep.choose_positive("nsfw", {"cats": 1, "dogs": 2})


def test_classification_reports_label_each_rule():
    y = np.array([0, 1, 1])
    text = rep.classification_reports(
        y,
        {"at the operating threshold (b >= 0.3000)": np.array([1, 1, 1]), "argmax (top class)": y},
        ["a", "b"],
    )
    first, second = text.split("== argmax (top class) ==")
    assert first.startswith("== at the operating threshold (b >= 0.3000) ==")
    assert "accuracy                         0.6667" in first
    assert "accuracy                         1.0000" in second


# -- the stage's steps on a hand-sized evaluation: val = SCORES10/TRUTH10, test below ------

TEST_SCORES = [0.95, 0.58, 0.52, 0.45, 0.9, 0.6, 0.1]
TEST_TRUTH = [1, 1, 1, 1, 0, 0, 0]
TEST_PATHS = [f"data/processed/{i}.jpg" for i in range(7)]


@pytest.fixture
def evaluation() -> rep.Evaluation:
    val = rep.Scored([f"v{i}" for i in range(14)], TRUTH10.astype(int), probs_of(SCORES10))
    test = rep.Scored(TEST_PATHS, np.array(TEST_TRUTH), probs_of(TEST_SCORES))
    cfg = Report(positive_class=None, target_recall=0.6, recall_confidence=0.9, batch_size=8)
    return rep.evaluate(val, test, NAMES, "sensitive", cfg)


def test_evaluate_decides_test_at_the_val_threshold(evaluation):
    ev = evaluation
    assert ev.operating_point["threshold"] == 0.55  # see the operating point test above
    # sensitive >= .55: .95 .58 (positives) and .9 .6 (negatives); argmax: >= .5
    assert {rule: y.tolist() for rule, y in ev.decisions.items()} == {
        "at the operating threshold (sensitive >= 0.5500)": [1, 1, 0, 0, 1, 1, 0],
        "argmax (top class)": [1, 1, 1, 0, 1, 1, 0],
    }
    # at the threshold 3 of 7 right; safe: P 1/3, R 1/3; sensitive: P 1/2, R 1/2
    # ROC AUC: 6 of 12 (positive, negative) pairs ranked right; AP: ranking
    # .95(P) .9(N) .6(N) .58(P) .52(P) .45(P) .1(N): (1 + 2/4 + 3/5 + 4/6) / 4
    assert {k: ev.metrics[k] for k in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "n")} == {
        "accuracy": 0.428571, "macro_f1": 0.416667, "roc_auc": 0.5, "pr_auc": 0.691667, "n": 7,
    }  # fmt: skip
    assert ev.metrics["argmax"]["accuracy"] == 0.571429  # 4 of 7
    assert ev.metrics["argmax"]["per_class"]["sensitive"]["recall"] == 0.75


def test_metric_and_plot_files(evaluation, tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "PATHS", Paths(tmp_path))
    files = rep.write_metrics(evaluation) + rep.write_plot_data(evaluation, tmp_path / "plots")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "metrics/test.json", "metrics/operating_point.json", "metrics/report/test_detail.json",
        "plots/predictions.csv", "plots/roc.csv", "plots/pr.csv",
    ]  # fmt: skip
    # the headline, in the order dvc exp show lists it
    assert (tmp_path / "metrics" / "test.json").read_text() == (
        '{\n  "accuracy": 0.428571,\n  "macro_f1": 0.416667,\n  "roc_auc": 0.5,\n'
        '  "pr_auc": 0.691667,\n  "recall": 0.5,\n  "precision": 0.5\n}\n'
    )
    detail = json.loads((tmp_path / "metrics" / "report" / "test_detail.json").read_text())
    assert list(detail) == ["positive_class", "accuracy", "macro_f1", "roc_auc", "pr_auc",
                            "n", "per_class", "argmax"]  # fmt: skip
    with (tmp_path / "plots" / "predictions.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(rep.PREDICTION_FIELDS)
    assert rows[1] == ["data/processed/0.jpg", "sensitive", "sensitive", "sensitive", "0.95"]
    assert rows[3] == ["data/processed/2.jpg", "sensitive", "safe", "sensitive", "0.52"]
    assert len(rows) == 8


class RecordingRun:
    """What the report logs to a ``tracking.Run``."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.metrics: dict = {}
        self.tags: dict = {}
        self.artifacts: list = []

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.metrics.update(metrics)

    def set_tags(self, tags: dict) -> None:
        self.tags.update(tags)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path).name, artifact_path))


def test_report_files_and_what_mlflow_gets(evaluation, tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "PATHS", Paths(tmp_path))  # thumbnails: none there (grey)
    files = rep.write_report_files(evaluation, tmp_path / "report")
    assert sorted(f.name for f in files) == sorted(p.name for p in (tmp_path / "report").iterdir())
    assert sorted(f.name for f in files) == [
        "classification_report.txt", "confusion_matrix.png", "curves.png", "mistakes.csv",
        "mistakes.png",
    ]  # fmt: skip
    text = (tmp_path / "report" / "classification_report.txt").read_text()
    assert text == evaluation.report_text
    assert text.startswith("== at the operating threshold (sensitive >= 0.5500) ==")
    # errors at the threshold: .9 and .6 flagged (safe), .52 and .45 missed (sensitive)
    with (tmp_path / "report" / "mistakes.csv").open(newline="") as fh:
        assert [r["path"][-5:] + " " + r["score"] for r in csv.DictReader(fh)] == [
            "4.jpg 0.9", "5.jpg 0.6", "3.jpg 0.55", "2.jpg 0.48",
        ]  # fmt: skip
    run = RecordingRun()
    cfg = Report(positive_class=None, target_recall=0.6, recall_confidence=0.9, batch_size=8)
    rep.log_to_mlflow(run, cfg, evaluation, files)
    assert run.params == {
        "report.positive_class": "None", "report.target_recall": "0.6",
        "report.recall_confidence": "0.9", "report.batch_size": "8",
    }  # fmt: skip
    assert run.metrics["test_accuracy"] == 0.428571
    assert run.metrics["test_argmax_accuracy"] == 0.571429
    assert run.metrics["op_threshold"] == 0.55 and run.metrics["op_test_recall"] == 0.5
    assert run.metrics["op_expected_recall"] == 0.663152
    assert run.tags == {"positive_class": "sensitive"}
    assert {a for _, a in run.artifacts} == {"report"} and len(run.artifacts) == 5
