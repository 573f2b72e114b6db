"""Stage ``report``: judge the candidate on the test split; choose the operating threshold.

Predictions are streamed in batches (``tf.data`` + ``model.predict``); only the scores are
kept, never the images. Serving decides at a threshold, so the report does too:

- ``operating_point.json``: the highest score threshold of the positive class whose
  one-sided lower confidence bound (Clopper-Pearson, at ``report.recall_confidence``) of
  *val* recall reaches ``report.target_recall`` (too few val positives: the lowest val
  positive score, ``bound_met: false``); what it promises (``expected``) and the
  precision/recall it gives on val and test. The positive class is
  ``report.positive_class``, or when null the rarest class of the training data (the log
  says which);
- ``test.json`` (the headline ``dvc exp show`` lists): at the operating threshold (what
  serving answers) accuracy, macro F1, the positive class's recall and precision; ROC AUC
  and PR AUC. ``report/test_detail.json``: per-class precision/recall/F1/support, and under
  ``argmax`` the same figures for the plain top class, for comparison;
- ``report/confusion_matrix.png`` (both rules, counts and row-normalised, each labelled) and
  ``report/classification_report.txt`` (scikit-learn format, both rules, labelled);
- plots: ``plots/predictions.csv`` (actual / predicted at the threshold, DVC's confusion
  template), ``plots/roc.csv``, ``plots/pr.csv``.

The quality gate is the next stage's (``promote``). MLflow: resumes the run ``train``
created and logs the report params, test metrics and report files.

This module scores, evaluates, writes and logs; the parts are
:mod:`~imgclf.pipeline.operating_point` (the threshold), :mod:`~imgclf.pipeline.report_metrics`
(the figures), :mod:`~imgclf.pipeline.report_plots` (the charts) and
:mod:`~imgclf.pipeline.report_mistakes` (the mistakes grid).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from imgclf.config import (
    PATHS,
    StageError,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)
from imgclf.files import write_bytes, write_csv, write_json
from imgclf.params import Report
from imgclf.pipeline.dataset import encode_labels, predict_probs, read_list
from imgclf.pipeline.operating_point import (
    decisions_at_threshold,
    describe_cost,
    describe_operating_point,
    operating_point,
    threshold_cost,
)
from imgclf.pipeline.report_metrics import (
    PR_FIELDS,
    ROC_FIELDS,
    classification_reports,
    compute_metrics,
    curve_rows,
    headline_metrics,
)
from imgclf.pipeline.report_mistakes import MISTAKE_FIELDS, mistakes_grid
from imgclf.pipeline.report_plots import plot_confusion, plot_curves
from imgclf.pipeline.stage_outputs import SIDES, read_json
from imgclf.pipeline.suspects import excluded_paths

log = logging.getLogger(__name__)


def choose_positive(named: str | None, class_counts: dict[str, int]) -> tuple[str, str]:
    """The positive class and why: ``named`` when set, else the rarest class in training
    (ties: the last name in sort order). A named class that is not a class is an error."""
    if named is not None:
        if named not in class_counts:
            raise StageError(
                f"report.positive_class {named!r} is not a class of the candidate: "
                f"{sorted(class_counts)}"
            )
        return named, "report.positive_class"
    rarest = min(sorted(class_counts, reverse=True), key=class_counts.__getitem__)
    total = sum(class_counts.values())
    why = f"the rarest class ({class_counts[rarest]} of {total} training images)"
    return rarest, why


@dataclass(frozen=True)
class Scored:
    """One side of the split scored by the candidate."""

    paths: list[str]  # as listed: relative to the project root
    y: np.ndarray  # class index per image
    probs: np.ndarray  # (images, classes) probabilities


def score_candidate(
    class_names: Sequence[str], image_size: int, batch_size: int, exclude: frozenset[str]
) -> tuple[Scored, Scored]:
    """The candidate's probabilities on the val side (without ``exclude``, as training left
    it) and on the whole test side (an empty test side is a :class:`StageError`)."""
    import keras

    model = keras.models.load_model(PATHS.model_file)
    scored = []
    for side, left_out in (("val", exclude), ("test", frozenset[str]())):
        listed = read_list(PATHS.split_list(side), left_out)
        probs = predict_probs(model, listed.files(PATHS.root), image_size, batch_size)
        scored.append(Scored(listed.paths, encode_labels(listed.labels, class_names), probs))
    val, test = scored
    if len(test.y) == 0:
        raise StageError("the test list is empty: rerun the split stage")
    return val, test


def count_in_split(label: str) -> int:
    """Images of class ``label`` on every side of the split."""
    return sum(read_list(PATHS.split_list(s)).labels.count(label) for s in SIDES)


ARGMAX_RULE = "argmax (top class)"
ARGMAX_FIELDS = ("accuracy", "macro_f1", "per_class")


@dataclass(frozen=True)
class Evaluation:
    """The candidate judged on test at the operating point chosen on val."""

    class_names: list[str]
    positive: str
    test: Scored
    operating_point: dict[str, Any]
    # rule title -> decided class per test image: the operating threshold's, then argmax
    decisions: dict[str, np.ndarray]
    # compute_metrics of the threshold's decisions, with ARGMAX_FIELDS of argmax's under "argmax"
    metrics: dict[str, Any]

    @property
    def positive_index(self) -> int:
        """Column of the positive class in ``test.probs``."""
        return self.class_names.index(self.positive)

    @property
    def at_threshold(self) -> np.ndarray:
        """The decisions serving makes: at the operating threshold."""
        return next(iter(self.decisions.values()))

    @property
    def report_text(self) -> str:
        """scikit-learn's classification report of each rule."""
        return classification_reports(self.test.y, self.decisions, self.class_names)


def evaluate(
    val: Scored,
    test: Scored,
    class_names: list[str],
    positive: str,
    cfg: Report,
    positives_in_split: int = 0,
) -> Evaluation:
    """Choose the operating threshold on ``val`` (:func:`operating_point`); decide ``test``
    at it and by argmax; the metrics of both, and the threshold's cost against argmax.
    ``positives_in_split`` (the positive class's images on every side) turns a shortfall
    of val positives into raw images (``raw_positives_short``)."""
    pos = class_names.index(positive)
    op = operating_point(
        val.probs[:, pos], val.y == pos, test.probs[:, pos], test.y == pos, positive,
        cfg.target_recall, cfg.recall_confidence, cfg.min_precision,
    )  # fmt: skip
    if op["positives_short"]:  # in raw images: val holds this share of the class
        share = int(np.sum(val.y == pos)) / max(1, positives_in_split)
        op["raw_positives_short"] = math.ceil(op["positives_short"] / share) if share else None
    at_threshold = decisions_at_threshold(test.probs, pos, op["threshold"])
    decisions = {
        f"at the operating threshold ({positive} >= {op['threshold']:.4f})": at_threshold,
        ARGMAX_RULE: test.probs.argmax(axis=1),
    }
    metrics = compute_metrics(test.y, at_threshold, test.probs, class_names, positive)
    argmax = compute_metrics(test.y, decisions[ARGMAX_RULE], test.probs, class_names, positive)
    metrics["argmax"] = {k: argmax[k] for k in ARGMAX_FIELDS}
    op["cost"] = threshold_cost(
        metrics["accuracy"], argmax["accuracy"], op["test"]["recall"],
        argmax["per_class"][positive]["recall"],
    )  # fmt: skip
    return Evaluation(class_names, positive, test, op, decisions, metrics)


def mlflow_metrics(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """MLflow metric names: ``test_accuracy``, ``test_safe_recall``,
    ``test_argmax_accuracy``, ... (None values left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(mlflow_metrics(value, prefix if key == "per_class" else f"{prefix}{key}_"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


PREDICTION_FIELDS = ("path", "actual", "predicted", "argmax", "score")


def prediction_rows(ev: Evaluation) -> list[list[Any]]:
    """Rows of :data:`PREDICTION_FIELDS`: each test image's class, its decisions at the
    threshold and by argmax, and its positive-class score (DVC's confusion template)."""
    names, test = ev.class_names, ev.test
    argmax = ev.decisions[ARGMAX_RULE]
    scores = test.probs[:, ev.positive_index]
    return [
        [path, names[a], names[b], names[c], round(float(s), 6)]
        for path, a, b, c, s in zip(
            test.paths, test.y, ev.at_threshold, argmax, scores, strict=True
        )
    ]


def write_metrics(ev: Evaluation) -> list[Path]:
    """``test.json`` (the headline), ``operating_point.json`` and the details,
    ``report/test_detail.json``."""
    return [
        write_json(PATHS.test_metrics, headline_metrics(ev.metrics, ev.operating_point)),
        write_json(PATHS.operating_point, ev.operating_point),
        write_json(
            PATHS.metrics / "report" / "test_detail.json",
            {"positive_class": ev.positive, **ev.metrics},
        ),
    ]


def write_plot_data(ev: Evaluation, folder: Path) -> list[Path]:
    """What ``dvc plots`` draws: ``predictions.csv`` (confusion matrix), ``roc.csv``,
    ``pr.csv`` (the positive class's curves)."""
    pos = ev.positive_index
    roc, pr = curve_rows(ev.test.y == pos, ev.test.probs[:, pos], ev.positive)
    return [
        write_csv(folder / "predictions.csv", PREDICTION_FIELDS, prediction_rows(ev)),
        write_csv(folder / "roc.csv", ROC_FIELDS, roc),
        write_csv(folder / "pr.csv", PR_FIELDS, pr),
    ]


def write_report_files(ev: Evaluation, folder: Path) -> list[Path]:
    """The human-readable report: classification reports, confusion matrices, ROC and PR
    curves with the operating point, and the most confident mistakes (PNG and CSV)."""
    test, labels = ev.test, list(range(len(ev.class_names)))
    matrices = {
        rule: confusion_matrix(test.y, y, labels=labels) for rule, y in ev.decisions.items()
    }
    mistakes = mistakes_grid(
        test.paths, test.y, ev.at_threshold, test.probs, ev.class_names, folder / "mistakes.png",
        root=PATHS.root,
    )  # fmt: skip
    threshold = ev.operating_point["threshold"]
    plot_curves(test.y, test.probs, ev.class_names, ev.positive, threshold, folder / "curves.png")
    op = ev.operating_point
    head = f"operating point: {describe_operating_point(op)}\n{describe_cost(op['cost'])}\n\n"
    return [
        write_bytes(folder / "classification_report.txt", (head + ev.report_text).encode()),
        plot_confusion(matrices, ev.class_names, folder / "confusion_matrix.png"),
        folder / "curves.png",
        folder / "mistakes.png",
        write_csv(folder / "mistakes.csv", MISTAKE_FIELDS, mistakes),
    ]


def log_evaluation(ev: Evaluation) -> None:
    """The test figures and classification reports, then the operating point (a warning
    when its recall target is not vouched for)."""
    rule = next(iter(ev.decisions))
    log.info(
        "test accuracy %.4f %s (argmax %.4f), macro F1 %.4f\n%s",
        ev.metrics["accuracy"], rule, ev.metrics["argmax"]["accuracy"], ev.metrics["macro_f1"],
        ev.report_text,
    )  # fmt: skip
    op = ev.operating_point
    (log.info if op["bound_met"] else log.warning)(
        "operating point: %s", describe_operating_point(op)
    )
    log.info("cost of the threshold: %s", describe_cost(op["cost"]))


def log_to_mlflow(run: Any, cfg: Report, ev: Evaluation, files: Sequence[Path]) -> None:
    """The report params, the test metrics (``test_*``), the operating point (``op_*``) and
    ``files`` (under ``report/``) to the candidate's MLflow run."""
    from imgclf import tracking

    op = ev.operating_point
    run.log_params(tracking.flatten({"report": cfg.model_dump()}))
    run.log_metrics(
        mlflow_metrics(ev.metrics)
        | {"op_threshold": op["threshold"]}
        | mlflow_metrics({s: op[s] for s in ("val", "test", "expected", "cost")}, "op_")
    )
    run.set_tags({"positive_class": ev.positive})
    for path in files:
        run.log_artifact(path, "report")


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg, meta = params.report, read_json(PATHS.model_metadata, written_by="train")
    class_names = list(meta["class_names"])
    positive, why = choose_positive(cfg.positive_class, meta["class_counts"])
    log.info("operating threshold for %r: %s", positive, why)
    import_tensorflow()
    from imgclf import tracking

    run = tracking.resume(tracking.read_run_link(), params.mlflow.experiment)
    with tracking.taken(run):
        exclude = excluded_paths(PATHS.audit / "label_issues.csv", params.audit.exclude)
        val, test = score_candidate(class_names, int(meta["image_size"]), cfg.batch_size, exclude)
        ev = evaluate(val, test, class_names, positive, cfg, count_in_split(positive))
        files = write_metrics(ev) + write_plot_data(ev, PATHS.metrics / "plots")
        files += write_report_files(ev, PATHS.metrics / "report")
        log_evaluation(ev)
        log_to_mlflow(run, cfg, ev, files)
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
