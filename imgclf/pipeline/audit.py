"""Stage ``audit``: find the images worth a person's look before they reach the model.

Every processed image of the split is checked (:mod:`~imgclf.pipeline.audit_model`):

- **label issues**: confident learning (cleanlab) on out-of-sample probabilities from
  ``audit.folds``-fold cross-validation over train+val (test scored by the fold models);
- **near-duplicates** (from ``data/split/groups.csv``): a near-duplicate of an image of
  another class is a label conflict; of its own class, a plain near-duplicate;
- **outliers**: cleanlab's out-of-distribution score on the pixel features;
- **blank** images: near-uniform pictures (``preprocess``'s flag in the manifest).

Outputs, in ``metrics/audit/``:

- ``label_issues.csv``: one row per suspect (columns in :mod:`~imgclf.pipeline.suspects`),
  ranked by label quality (most likely wrong first), with the raw path to put into
  ``data/labels_override.csv``;
- ``summary.json`` (a ``dvc metrics`` file): counts by issue kind, the estimated noise rate
  per class, the cross-validated accuracy;
- ``index.html``: the gallery to review them in a browser (filter by kind), also logged to
  MLflow with the other two, in a run of its own (``audit-<run name>``) in the experiment
  ``<mlflow.experiment>-audit``, apart from the pipeline's runs.

``audit.exclude`` (``label_issues`` or ``suspects``) makes ``train`` and ``report`` leave the
train and val suspects out; the test side is never filtered (see
:mod:`~imgclf.pipeline.suspects`).
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.config import (
    PATHS,
    StageError,
    import_tensorflow,
    load_params,
    setup_logging,
    stage_main,
)
from imgclf.files import write_csv, write_json
from imgclf.imaging import DecodeOptions
from imgclf.params import Audit, Params
from imgclf.pipeline import suspects
from imgclf.pipeline.audit_gallery import gallery_html, thumbnail_jpeg
from imgclf.pipeline.audit_model import (
    LabelFindings,
    Probabilities,
    cnn_fit_predict,
    fold_of,
    knn_fit_predict,
    label_findings,
    out_of_sample_probs,
    outliers,
    pixel_features,
)
from imgclf.pipeline.dataset import data_hash, encode_labels, read_list
from imgclf.pipeline.stage_outputs import require

log = logging.getLogger(__name__)

SIDES = ("train", "val", "test")
THUMBNAIL_SIDE = 128


@dataclass(frozen=True)
class AuditData:
    """Every image of the split: train and val first (the cross-validated part), then test."""

    paths: list[str]  # processed image, relative to the root
    sides: list[str]
    labels: list[str]
    class_names: list[str]
    raw_paths: list[str]
    blank: np.ndarray  # bool
    groups: list[str]  # near-duplicate group name, or "" for none

    @property
    def y(self) -> np.ndarray:
        """Class indices of the given labels."""
        return encode_labels(self.labels, self.class_names)

    @property
    def n_train_val(self) -> int:
        """How many images are cross-validated (they come first)."""
        return sum(side != "test" for side in self.sides)


def read_rows(path: Path, written_by: str) -> list[dict[str, str]]:
    """The rows of a CSV file an earlier stage wrote."""
    require(path, written_by=written_by)
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_audit_data(split_dir: Path, manifest: Path) -> AuditData:
    """The split lists, their raw paths and blank flags (manifest), and the groups."""
    lists = {side: read_list(split_dir / f"{side}.csv") for side in SIDES}
    by_output = {r["output_path"]: r for r in read_rows(manifest, "preprocess")}
    group_of = {r["path"]: r["group"] for r in read_rows(split_dir / "groups.csv", "split")}
    paths = [p for side in SIDES for p in lists[side].paths]
    return AuditData(
        paths=paths,
        sides=[side for side in SIDES for _ in lists[side].paths],
        labels=[label for side in SIDES for label in lists[side].labels],
        class_names=sorted(set(lists["train"].labels)),
        raw_paths=[by_output[p]["raw_path"] for p in paths],
        blank=np.array([by_output[p]["flags"] == "blank" for p in paths], dtype=bool),
        groups=[group_of.get(p, "") for p in paths],
    )


def probabilities(
    data: AuditData, features: np.ndarray, cfg: Audit, params: Params
) -> Probabilities:
    """Out-of-sample probabilities of every image with the ``audit.model`` (folds seeded
    from the split seed, models from the train seed)."""
    n, y = data.n_train_val, data.y
    groups = [g or p for g, p in zip(data.groups[:n], data.paths[:n], strict=True)]
    try:
        fold = fold_of(y[:n], groups, cfg.folds, params.split_seed)
    except ValueError as exc:  # too few images for the folds: the user's to fix
        raise StageError(str(exc)) from None
    test_index = np.arange(n, len(data.paths))
    if cfg.model == "knn":
        fit_predict = knn_fit_predict(features, y)
    else:
        import_tensorflow()
        files = [f"{PATHS.root}/{p}" for p in data.paths]
        fit_predict = cnn_fit_predict(
            files, y, params.preprocess.size, params.train, cfg.epochs, params.train_seed
        )
    return out_of_sample_probs(fold, test_index, len(data.class_names), fit_predict)


def duplicate_kinds(data: AuditData) -> dict[int, tuple[str, str]]:
    """Image index -> (near-duplicate kind, the label its group suggests).

    In a group spanning classes, the images whose label is not the group's majority label
    are conflicts (all of them on a tie); the others are plain near-duplicates.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(data.groups):
        if group:
            members[group].append(i)
    kinds = {}
    for indices in members.values():
        votes = Counter(data.labels[i] for i in indices).most_common()
        majority = votes[0][0] if len(votes) == 1 or votes[0][1] > votes[1][1] else None
        for i in indices:
            own = data.labels[i]
            if len(votes) > 1 and own != majority:
                other = majority or next(label for label, _ in votes if label != own)
                kinds[i] = (suspects.CONFLICT, other)
            else:
                kinds[i] = (suspects.NEAR_DUPLICATE, own)
    return kinds


def suspect_rows(
    data: AuditData,
    findings: LabelFindings,
    outlier_scores: np.ndarray,
    is_outlier: np.ndarray,
) -> list[dict[str, str]]:
    """One row per image with at least one issue, ranked by label quality (lowest first)."""
    dup = duplicate_kinds(data)
    rows = []
    for i, path in enumerate(data.paths):
        dup_kind, dup_label = dup.get(i, ("", ""))
        kinds = [
            kind
            for kind, present in (
                (suspects.LABEL_ISSUE, bool(findings.is_issue[i])),
                (suspects.CONFLICT, dup_kind == suspects.CONFLICT),
                (suspects.OUTLIER, bool(is_outlier[i])),
                (suspects.BLANK, bool(data.blank[i])),
                (suspects.NEAR_DUPLICATE, dup_kind == suspects.NEAR_DUPLICATE),
            )
            if present
        ]
        suggested = data.class_names[int(findings.suggested[i])]
        if dup_kind == suspects.CONFLICT and not findings.is_issue[i]:
            suggested = dup_label
        if kinds:
            rows.append(
                {
                    "raw_path": data.raw_paths[i],
                    "path": path,
                    "side": data.sides[i],
                    "issues": ";".join(kinds),
                    "given_label": data.labels[i],
                    "suggested_label": suggested,
                    "label_quality": f"{findings.quality[i]:.4f}",
                    "outlier_score": f"{outlier_scores[i]:.4f}",
                    "group": data.groups[i],
                }
            )
    rows.sort(key=lambda r: (float(r["label_quality"]), r["path"]))
    return [{"rank": str(k), **row} for k, row in enumerate(rows, start=1)]


def summarize(
    data: AuditData, rows: list[dict[str, str]], findings: LabelFindings, probs: Probabilities
) -> dict[str, Any]:
    """``metrics/audit/summary.json``: counts by kind, the largest noise rate, and the
    cross-validated accuracy of the audit model on train+val (the audit params are in
    ``params.yaml``, so ``dvc exp show`` has them already)."""
    n = data.n_train_val
    counts = dict.fromkeys(suspects.KINDS, 0)
    for row in rows:
        for kind in row["issues"].split(";"):
            counts[kind] += 1
    accuracy = float(np.mean(probs.train_val.argmax(axis=1) == data.y[:n]))
    return {
        "images": len(data.paths),
        "suspects": len(rows),
        "by_kind": counts,
        "noise_rate_max": round(float(np.max(findings.noise_rate)), 4),
        "cv_accuracy": round(accuracy, 4),
    }


def noise_rates(data: AuditData, findings: LabelFindings) -> dict[str, float]:
    """The estimated noise rate per class (the log, the gallery and MLflow show them;
    ``summary.json`` keeps only the largest, so ``dvc exp show`` does not widen a column a
    class)."""
    return {
        name: round(float(rate), 4)
        for name, rate in zip(data.class_names, findings.noise_rate, strict=True)
    }


def write_gallery(rows: list[dict[str, str]], summary: dict[str, Any], path: Path) -> Path:
    """``index.html`` with a thumbnail of each suspect (``summary`` is shown on top)."""
    thumbs = {r["path"]: thumbnail_jpeg(PATHS.root / r["path"], THUMBNAIL_SIDE) for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gallery_html(rows, thumbs, summary, suspects.KINDS), encoding="utf-8")
    return path


def log_audit(
    summary: dict[str, Any],
    cfg: Audit,
    seconds: float,
    shown: list[Path],
    top: list[dict[str, str]],
) -> None:
    """The log lines of an audit: counts, noise rates, the first suspects, where to look."""
    log.info(
        "audit of %d images in %.1f s (%s, %d folds, cross-validated accuracy %.3f): %s",
        summary["images"], seconds, cfg.model, cfg.folds, summary["cv_accuracy"],
        ", ".join(f"{n} {kind}" for kind, n in summary["by_kind"].items()),
    )  # fmt: skip
    log.info(
        "estimated noise rate per class: %s",
        ", ".join(f"{k} {v:.1%}" for k, v in summary["noise_rate"].items()),
    )
    for row in top:
        log.info(
            "  #%s %s: %s -> %s (label quality %s; %s)",
            row["rank"], row["raw_path"], row["given_label"], row["suggested_label"],
            row["label_quality"], row["issues"],
        )  # fmt: skip
    log.info("review them in %s", " and ".join(f.relative_to(PATHS.root).as_posix() for f in shown))


def log_to_mlflow(
    params: Params, summary: dict[str, Any], seconds: float, files: list[Path]
) -> None:
    """An MLflow run of its own (``audit-<run name>``, tagged ``stage: audit`` and with the
    data hash) in the experiment ``<mlflow.experiment>-audit``: the audit params, counts and
    time as metrics, the three files as artifacts."""
    from imgclf import tracking

    lists = [PATHS.split_list(side) for side in SIDES]
    dhash = data_hash(lists, DecodeOptions.from_params(params.preprocess))
    experiment = tracking.audit_experiment(params.mlflow.experiment)
    run, _, _ = tracking.start_run(experiment, dhash, {"stage": "audit"}, "audit-")
    with tracking.taken(run):
        run.log_params(tracking.flatten({"audit": params.audit.model_dump()}))
        counts = {f"audit_{kind}": float(n) for kind, n in summary["by_kind"].items()}
        extra = {"audit_cv_accuracy": summary["cv_accuracy"], "audit_seconds": seconds}
        run.log_metrics(counts | extra)
        for path in files:
            run.log_artifact(path, "audit")
    tracking.check_required(run, params.mlflow.required)


def audit(
    data: AuditData, params: Params
) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, float]]:
    """The ranked suspects, the summary and the noise rate per class of ``data`` (pure but
    for reading images)."""
    cfg = params.audit
    features = pixel_features([PATHS.root / p for p in data.paths], cfg.feature_size)
    probs = probabilities(data, features, cfg, params)
    findings = label_findings(data.y, np.concatenate([probs.train_val, probs.test]))
    scores, is_outlier = outliers(features)
    rows = suspect_rows(data, findings, scores, is_outlier)
    return rows, summarize(data, rows, findings, probs), noise_rates(data, findings)


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    start = time.perf_counter()
    data = load_audit_data(PATHS.split_dir, PATHS.manifest)
    rows, summary, rates = audit(data, params)
    table = ([row[f] for f in suspects.FIELDS] for row in rows)
    shown = summary | {"noise_rate": rates}
    settings = {"model": params.audit.model, "folds": params.audit.folds}
    files = [
        write_csv(PATHS.audit / "label_issues.csv", suspects.FIELDS, table),
        write_json(PATHS.audit / "summary.json", summary),
        write_gallery(rows, shown | settings, PATHS.audit / "index.html"),
    ]
    seconds = time.perf_counter() - start
    log_audit(shown, params.audit, seconds, [files[0], files[2]], rows[:5])
    log_to_mlflow(params, summary, seconds, files)


if __name__ == "__main__":
    sys.exit(main())
