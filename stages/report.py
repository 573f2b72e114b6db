"""Stage ``report``: evaluate the model on the test split; choose the operating threshold.

Predictions are streamed in batches (``tf.data`` + ``model.predict``); only the scores are
kept, never the images. Outputs (all under ``metrics/``):

- ``test.json``: accuracy, macro F1, per-class precision/recall/F1/support, ROC AUC, PR AUC;
- ``operating_point.json``: the score threshold of ``report.positive_class`` reaching
  ``report.target_recall`` on the *val* split, and the precision/recall it gives on val and
  test (serving reads it beside the model);
- ``report/confusion_matrix.png`` (counts and row-normalised) and
  ``report/classification_report.txt`` (scikit-learn format);
- plots: ``plots/predictions.csv`` (actual/predicted, DVC's confusion template),
  ``plots/roc.csv``, ``plots/pr.csv``.

Quality gate: with ``report.min_accuracy`` set, a lower test accuracy fails the stage
(after writing the outputs above, for inspection) and the model is not registered.
MLflow: resumes the run ``train`` created (id in ``models/metadata.json``), logs params,
test metrics, artifacts and the model with its signature, then registers it under
``mlflow.registered_model`` when the gate passes.
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

from stages.config import PATHS, digest, load_params, section, setup_logging

log = logging.getLogger(__name__)


def _num(value: float) -> float | None:
    """Rounded float, None for NaN (JSON has no NaN)."""
    return None if value is None or math.isnan(value) else round(float(value), 6)


def compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], positive: str
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class P/R/F1, ROC AUC and PR AUC.

    Two classes: the AUCs are of ``positive``'s score; more: macro one-vs-rest. An AUC that is
    undefined (a class absent from ``y_true``) is ``None``.
    """
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
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


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Counts and row-normalised confusion matrices side by side, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.6 * k + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, data, title, fmt in (
        (axes[0], cm, "counts", "{:d}"),
        (axes[1], norm, "normalised by true class", "{:.2f}"),
    ):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        for i in range(k):
            for j in range(k):
                value = int(data[i, j]) if fmt == "{:d}" else float(data[i, j])
                ax.text(
                    j,
                    i,
                    fmt.format(value),
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.5 else "black",
                )
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


def flat(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """MLflow metric names: ``test_accuracy``, ``test_safe_recall``, ..."""
    out = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
    for name, values in metrics.get("per_class", {}).items():
        out.update({f"{prefix}{name}_{k}": v for k, v in values.items() if v is not None})
    return {k: v for k, v in out.items() if v is not None}


def main() -> None:
    params = load_params()
    base, cfg = section(params, "base"), section(params, "report")
    ml = params.get("mlflow") or {}
    setup_logging(base.get("log_level", "INFO"))

    import keras

    from stages import tracking
    from stages.train import encode_labels, read_list

    meta = json.loads(PATHS.model_metadata.read_text(encoding="utf-8"))
    class_names, size = list(meta["class_names"]), int(meta["image_size"])
    positive = str(cfg.get("positive_class") or class_names[-1])
    if positive not in class_names:
        raise ValueError(f"report.positive_class {positive!r} is not a class: {class_names}")
    pos = class_names.index(positive)
    model = keras.models.load_model(PATHS.model_file)
    batch = int(cfg.get("batch_size", 64))

    root = str(PATHS.root)
    sides = {}
    for side in ("val", "test"):
        paths, labels = read_list(PATHS.split_list(side))
        probs = predict(model, [f"{root}/{p}" for p in paths], size, batch)
        sides[side] = (paths, encode_labels(labels, class_names), probs)
    test_paths, y_test, p_test = sides["test"]
    _, y_val, p_val = sides["val"]
    if len(y_test) == 0:
        raise ValueError("the test list is empty")

    out = PATHS.metrics
    metrics = compute_metrics(y_test, p_test, class_names, positive)
    write_json(metrics, out / "test.json")
    op = operating_point(
        p_val[:, pos], y_val == pos, p_test[:, pos], y_test == pos, positive,
        float(cfg.get("target_recall", 0.95)),
    )  # fmt: skip
    write_json(op, PATHS.operating_point)
    text = classification_report(
        y_test, p_test.argmax(1), labels=list(range(len(class_names))),
        target_names=class_names, digits=4, zero_division=0,
    )  # fmt: skip
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "classification_report.txt").write_text(text, encoding="utf-8")
    cm = confusion_matrix(y_test, p_test.argmax(1), labels=list(range(len(class_names))))
    plot_confusion(cm, class_names, out / "report" / "confusion_matrix.png")
    write_csv(
        [
            {"path": p, "actual": class_names[a], "predicted": class_names[b], "score": round(s, 6)}
            for p, a, b, s in zip(test_paths, y_test, p_test.argmax(1), p_test[:, pos], strict=True)
        ],
        ("path", "actual", "predicted", "score"),
        out / "plots" / "predictions.csv",
    )
    roc, pr = curve_rows(y_test == pos, p_test[:, pos])
    write_csv(roc, ("fpr", "tpr", "threshold"), out / "plots" / "roc.csv")
    write_csv(pr, ("recall", "precision", "threshold"), out / "plots" / "pr.csv")
    log.info(
        "test accuracy %.4f, macro F1 %.4f\n%s", metrics["accuracy"], metrics["macro_f1"], text
    )
    log.info(
        "operating point: %s >= %.4f (val recall %s); test precision %s recall %s",
        positive, op["threshold"], op["val"]["recall"], op["test"]["precision"],
        op["test"]["recall"],
    )  # fmt: skip

    min_acc = cfg.get("min_accuracy")
    passed = min_acc is None or metrics["accuracy"] >= float(min_acc)

    # -- MLflow: resume train's run ----------------------------------------------------
    uri = tracking.tracking_uri()
    key = f"{meta['created']}-{meta['params_digest']}"
    pending = PATHS.cache / "mlflow-pending"
    experiment = str(ml.get("experiment", "imgclf"))
    if (
        meta.get("mlflow_run_id") is None
        and (pending / f"{tracking.pending_key(key)}.json").exists()
    ):
        run = tracking.Run.offline(uri, experiment, key, pending, "train could not reach MLflow")
    else:
        run = tracking.Run.start(
            uri, experiment, key, pending, run_id=meta.get("mlflow_run_id"),
            tags=tracking.run_tags(meta["data_hash"], PATHS.root),
        )  # fmt: skip
    report_params = {"report": cfg, "mlflow": {"registered_model": ml.get("registered_model")}}
    run.log_params(tracking.flatten(report_params))
    run.log_metrics(
        flat(metrics)
        | {
            "op_threshold": op["threshold"],
            **{
                f"op_{s}_{k}": v for s in ("val", "test") for k, v in op[s].items() if v is not None
            },
        }
    )
    for path in (
        out / "report" / "confusion_matrix.png",
        out / "report" / "classification_report.txt",
        out / "test.json",
        PATHS.operating_point,
        out / "plots" / "predictions.csv",
        out / "plots" / "roc.csv",
        out / "plots" / "pr.csv",
    ):
        run.log_artifact(path, "report")
    from mlflow.models import infer_signature

    example = np.zeros((1, size, size, 3), dtype=np.float32)
    model_uri = run.log_keras_model(
        model, infer_signature(example, model.predict(example, verbose=0))
    )
    run.set_tags({"quality_gate": "passed" if passed else "failed", "report_digest": digest(cfg)})
    if not passed:
        run.end("FAILED")
        sys.exit(
            f"QUALITY GATE FAILED: test accuracy {metrics['accuracy']:.4f} < report.min_accuracy "
            f"{float(min_acc):.4f}; the model is not registered"
        )
    name = str(ml.get("registered_model") or "")
    if name:
        version = run.register(model_uri, name)
        if version:
            log.info("registered %s version %s", name, version)
            run.set_tags({"registered_model": name, "registered_version": version})
    run.end("FINISHED")
    if not run.ok and ml.get("required"):
        sys.exit(f"MLflow tracking failed and mlflow.required is set: {run.error}")


if __name__ == "__main__":
    main()
