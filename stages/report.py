"""Stage ``report``: judge the candidate on the test split; choose the operating threshold.

Predictions are streamed in batches (``tf.data`` + ``model.predict``); only the scores are
kept, never the images. Serving decides at a threshold, so the report does too:

- ``operating_point.json``: the score threshold of the positive class reaching
  ``report.target_recall`` on the *val* split, and the precision/recall it gives on val and
  test. The positive class is ``report.positive_class``, or when null the rarest class of
  the training data (the log says which);
- ``test.json``: at the operating threshold (what serving answers): accuracy, macro F1,
  per-class precision/recall/F1/support; threshold-free ROC AUC and PR AUC; and under
  ``argmax`` the same figures for the plain top class, for comparison;
- ``report/confusion_matrix.png`` (both rules, counts and row-normalised, each labelled) and
  ``report/classification_report.txt`` (scikit-learn format, both rules, labelled);
- plots: ``plots/predictions.csv`` (actual / predicted at the threshold, DVC's confusion
  template), ``plots/roc.csv``, ``plots/pr.csv``.

The quality gate is the next stage's (``promote``). MLflow: resumes the run ``train``
created and logs the report params, test metrics and report files.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from stages.config import (
    PATHS,
    StageError,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)

log = logging.getLogger(__name__)


def _num(value: float) -> float | None:
    """Rounded float, None for NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 6)


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


def decide(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row as serving decides: ``positive`` when its score reaches the
    threshold, else the most probable other class."""
    others = probs.copy()
    others[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, others.argmax(axis=1))


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive: str,
) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class P/R/F1 of the decisions ``y_pred``; ROC AUC and PR
    AUC of the scores ``probs``.

    Two classes: the AUCs are of ``positive``'s score; more: macro one-vs-rest. An AUC that is
    undefined (a class absent from ``y_true``) is ``None``.
    """
    k = len(class_names)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    onehot = np.eye(k)[y_true]
    try:
        if k == 2:
            pos = list(class_names).index(positive)
            roc = roc_auc_score(onehot[:, pos], probs[:, pos])
            pr = average_precision_score(onehot[:, pos], probs[:, pos])
        else:
            roc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=labels)
            pr = average_precision_score(onehot, probs, average="macro")
    except ValueError:
        roc = pr = float("nan")
    return {
        "accuracy": _num(accuracy_score(y_true, y_pred)),
        "macro_f1": _num(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": _num(roc),
        "pr_auc": _num(pr),
        "n": len(y_true),
        "per_class": {
            name: {
                "precision": _num(p[i]),
                "recall": _num(r[i]),
                "f1": _num(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def threshold_for_recall(scores: np.ndarray, is_positive: np.ndarray, target: float) -> float:
    """Highest threshold ``t`` with recall(``score >= t``) >= ``target``.

    It is the ``ceil(target * n_pos)``-th highest score of a positive example.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"report.target_recall must be in (0, 1], got {target}")
    pos = np.sort(np.asarray(scores)[np.asarray(is_positive, dtype=bool)])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive example to choose a threshold from")
    need = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[need - 1])


def precision_recall_at(
    scores: np.ndarray, is_positive: np.ndarray, threshold: float
) -> dict[str, float | None]:
    """Precision and recall of ``score >= threshold`` (precision None if nothing is flagged)."""
    flagged = np.asarray(scores) >= threshold
    truth = np.asarray(is_positive, dtype=bool)
    tp = int(np.sum(flagged & truth))
    precision = tp / int(flagged.sum()) if flagged.any() else None
    recall = tp / int(truth.sum()) if truth.any() else None
    return {
        "precision": None if precision is None else round(precision, 6),
        "recall": None if recall is None else round(recall, 6),
    }


def operating_point(
    val_scores: np.ndarray,
    val_positive: np.ndarray,
    test_scores: np.ndarray,
    test_positive: np.ndarray,
    positive: str,
    target_recall: float,
) -> dict[str, Any]:
    """Threshold chosen on val, then measured on val and test (``operating_point.json``)."""
    t = threshold_for_recall(val_scores, val_positive, target_recall)
    return {
        "positive_class": positive,
        "target_recall": float(target_recall),
        "threshold": round(t, 8),
        "val": precision_recall_at(val_scores, val_positive, t),
        "test": precision_recall_at(test_scores, test_positive, t),
    }


def curve_rows(is_positive: np.ndarray, scores: np.ndarray) -> tuple[list[dict], list[dict]]:
    """ROC (``fpr, tpr, threshold``) and PR (``recall, precision, threshold``) points."""
    fpr, tpr, roc_t = roc_curve(is_positive, scores)
    prec, rec, pr_t = precision_recall_curve(is_positive, scores)
    roc = [
        {"fpr": round(a, 6), "tpr": round(b, 6), "threshold": round(min(c, 1.0), 6)}
        for a, b, c in zip(fpr, tpr, roc_t, strict=True)
    ]
    pr = [
        {"recall": round(a, 6), "precision": round(b, 6), "threshold": round(c, 6)}
        for a, b, c in zip(rec[:-1], prec[:-1], pr_t, strict=True)
    ]
    return roc, pr


def plot_confusion(matrices: dict[str, np.ndarray], class_names: Sequence[str], path: Path) -> None:
    """One row per decision rule (its name is the row's title): counts and row-normalised
    confusion matrices, drawn with scikit-learn's ``ConfusionMatrixDisplay``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(class_names)
    side = max(4.0, 0.6 * k + 2.5)
    rows = len(matrices)
    fig, axes = plt.subplots(rows, 2, figsize=(2 * side + 1, side * rows), squeeze=False)
    for (rule, cm), (left, right) in zip(matrices.items(), axes, strict=True):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        for ax, data, what, fmt in ((left, cm, "counts", "d"), (right, norm, "row share", ".2f")):
            ConfusionMatrixDisplay(data, display_labels=list(class_names)).plot(
                ax=ax, cmap="Blues", colorbar=False, values_format=fmt, xticks_rotation=45
            )
            ax.set_title(f"{rule}\n{what}", fontsize=10)
            ax.set_xlabel("predicted")
            ax.set_ylabel("actual")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def predict(model, paths: Sequence[str], image_size: int, batch_size: int) -> np.ndarray:
    """Class probabilities of the images at ``paths``, streamed batch by batch."""
    from stages.train import make_dataset

    if not paths:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    ds = make_dataset(paths, np.zeros(len(paths), np.int32), image_size, batch_size, cache=False)
    return model.predict(ds.map(lambda x, _y: x), verbose=0)


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


def report_text(
    y_true: np.ndarray, decisions: dict[str, np.ndarray], class_names: Sequence[str]
) -> str:
    """scikit-learn's classification report once per decision rule, each under its title."""
    labels = list(range(len(class_names)))
    parts = []
    for rule, y_pred in decisions.items():
        body = classification_report(
            y_true, y_pred, labels=labels, target_names=list(class_names), digits=4,
            zero_division=0,
        )  # fmt: skip
        parts.append(f"== {rule} ==\n\n{body}")
    return "\n".join(parts)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    cfg = params.report
    if not PATHS.model_metadata.is_file():
        raise StageError(f"no candidate in {PATHS.candidate}: run the train stage first")
    meta = json.loads(PATHS.model_metadata.read_text(encoding="utf-8"))
    class_names, size = list(meta["class_names"]), int(meta["image_size"])
    positive, why = choose_positive(cfg.positive_class, meta["class_counts"])
    log.info("operating threshold for %r: %s", positive, why)
    pos = class_names.index(positive)

    import_tensorflow()
    import keras

    from stages import tracking
    from stages.train import encode_labels, read_list

    run = tracking.resume(meta, params.mlflow.experiment)
    with tracking.taken(run):
        model = keras.models.load_model(PATHS.model_file)
        root = str(PATHS.root)
        sides = {}
        for side in ("val", "test"):
            paths, labels = read_list(PATHS.split_list(side))
            probs = predict(model, [f"{root}/{p}" for p in paths], size, cfg.batch_size)
            sides[side] = (paths, encode_labels(labels, class_names), probs)
        test_paths, y_test, p_test = sides["test"]
        _, y_val, p_val = sides["val"]
        if len(y_test) == 0:
            raise StageError("the test list is empty: rerun the split stage")

        op = operating_point(
            p_val[:, pos], y_val == pos, p_test[:, pos], y_test == pos, positive,
            cfg.target_recall,
        )  # fmt: skip
        at_threshold = f"at the operating threshold ({positive} >= {op['threshold']:.4f})"
        decisions = {
            at_threshold: decide(p_test, pos, op["threshold"]),
            "argmax (top class)": p_test.argmax(axis=1),
        }
        y_thr, y_arg = decisions.values()
        metrics = compute_metrics(y_test, y_thr, p_test, class_names, positive)
        argmax = compute_metrics(y_test, y_arg, p_test, class_names, positive)
        metrics["argmax"] = {k: argmax[k] for k in ("accuracy", "macro_f1", "per_class")}
        out = PATHS.metrics
        write_json(metrics, PATHS.test_metrics)
        write_json(op, PATHS.operating_point)
        text = report_text(y_test, decisions, class_names)
        (out / "report").mkdir(parents=True, exist_ok=True)
        (out / "report" / "classification_report.txt").write_text(text, encoding="utf-8")
        labels = list(range(len(class_names)))
        plot_confusion(
            {rule: confusion_matrix(y_test, y, labels=labels) for rule, y in decisions.items()},
            class_names,
            out / "report" / "confusion_matrix.png",
        )
        write_csv(
            [
                {
                    "path": p, "actual": class_names[a], "predicted": class_names[b],
                    "argmax": class_names[c], "score": round(float(s), 6),
                }
                for p, a, b, c, s in zip(
                    test_paths, y_test, y_thr, y_arg, p_test[:, pos], strict=True
                )
            ],
            ("path", "actual", "predicted", "argmax", "score"),
            out / "plots" / "predictions.csv",
        )  # fmt: skip
        roc, pr = curve_rows(y_test == pos, p_test[:, pos])
        write_csv(roc, ("fpr", "tpr", "threshold"), out / "plots" / "roc.csv")
        write_csv(pr, ("recall", "precision", "threshold"), out / "plots" / "pr.csv")
        log.info(
            "test accuracy %.4f %s (argmax %.4f), macro F1 %.4f\n%s",
            metrics["accuracy"], at_threshold, argmax["accuracy"], metrics["macro_f1"], text,
        )  # fmt: skip
        log.info(
            "operating point: %s >= %.4f (val recall %s); test precision %s recall %s",
            positive, op["threshold"], op["val"]["recall"], op["test"]["precision"],
            op["test"]["recall"],
        )  # fmt: skip

        run.log_params(tracking.flatten({"report": cfg.model_dump()}))
        run.log_metrics(
            mlflow_metrics(metrics)
            | {"op_threshold": op["threshold"]}
            | mlflow_metrics({s: op[s] for s in ("val", "test")}, "op_")
        )
        run.set_tags({"positive_class": positive})
        for path in (
            out / "report" / "confusion_matrix.png",
            out / "report" / "classification_report.txt",
            PATHS.test_metrics,
            PATHS.operating_point,
            out / "plots" / "predictions.csv",
            out / "plots" / "roc.csv",
            out / "plots" / "pr.csv",
        ):
            run.log_artifact(path, "report")
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
