"""What the ``audit`` stage computes: out-of-sample probabilities, and cleanlab's findings.

- **Out-of-sample probabilities** (:func:`out_of_sample_probs`): K-fold cross-validation
  over train+val, folds stratified by class and never splitting a near-duplicate group
  (scikit-learn's ``StratifiedGroupKFold``), so no image is scored by a model that saw it
  or its copy. Test images are scored by the mean of the K fold models (none saw them).
  Two models (``audit.model``): ``knn`` on small pixel features (seconds), or ``cnn``, the
  ``train`` params' architecture fit ``audit.epochs`` per fold (K trainings: the judge for
  photos, with a pretrained backbone). Measured on the digits with 5% of the labels moved
  (``benchmarks/bench_audit.py``, RESULTS.md "Data audit"): both find the moved files with
  precision and recall above 0.8; a logistic regression (precision 0.42) and an RBF SVM
  (0.65 with calibrated probabilities) on the same features did not and were dropped.
- **Findings** (:func:`label_findings`, :func:`outliers`): cleanlab's confident learning
  (``find_label_issues``, ``get_label_quality_scores``, the noise matrices) and its
  out-of-distribution scores on the features, flagged with the fence cleanlab's Datalab
  uses (mean kNN distance above Q3 + 1.7 IQR).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

# (train indices, [indices to predict, ...]) -> probabilities for each index set
FitPredict = Callable[[np.ndarray, Sequence[np.ndarray]], list[np.ndarray]]
KNN_NEIGHBOURS = 10
# cleanlab Datalab's default feature-outlier threshold t: the fence is Q3 + (1/t - 1) IQR
OUTLIER_THRESHOLD = 0.37037


def pixel_features(paths: Sequence[Path], side: int) -> np.ndarray:
    """Each image box-reduced to ``side`` x ``side`` RGB, as float32 rows in [0, 1]."""
    rows = np.empty((len(paths), side * side * 3), dtype=np.float32)
    for i, path in enumerate(tqdm(paths, desc="audit features", unit="img", disable=None)):
        with Image.open(path) as img:
            small = img.convert("RGB").resize((side, side), Image.Resampling.BOX)
        rows[i] = np.asarray(small, dtype=np.float32).ravel() / 255.0
    return rows


def fold_of(y: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) each image is held out in: stratified by class, near-duplicate
    groups never split (``StratifiedGroupKFold``, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    smallest = int(np.bincount(y).min()) if len(y) else 0
    if len(y) < folds or smallest < 2:
        raise ValueError(
            f"audit.folds {folds} needs at least {folds} train+val images and 2 of each "
            f"class; found {len(y)} images, the smallest class with {smallest}"
        )
    fold = np.full(len(y), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y, list(groups))):
        fold[held_out] = k
    return fold


@dataclass(frozen=True)
class Probabilities:
    """Out-of-sample class probabilities: of train+val (held-out folds) and of test."""

    train_val: np.ndarray
    test: np.ndarray


def out_of_sample_probs(
    fold: np.ndarray, test_index: np.ndarray, n_classes: int, fit_predict: FitPredict
) -> Probabilities:
    """Fit once per fold on the other folds; predict the held-out fold and the test
    images (``test_index``: indices into the same data ``fit_predict`` reads, after the
    train+val images). Test probabilities are the mean over folds."""
    folds = int(fold.max()) + 1
    held = np.zeros((len(fold), n_classes), dtype=np.float64)
    test = np.zeros((len(test_index), n_classes), dtype=np.float64)
    for k in range(folds):
        log.info("audit fold %d of %d", k + 1, folds)
        train_index, held_index = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        held_probs, test_probs = fit_predict(train_index, [held_index, test_index])
        held[held_index] = held_probs
        test += test_probs / folds
    return Probabilities(held, test)


def knn_fit_predict(x: np.ndarray, y: np.ndarray) -> FitPredict:
    """10 nearest neighbours on the pixel features ``x``, distance-weighted votes (fewer
    neighbours when a fold has fewer images)."""
    from sklearn.neighbors import KNeighborsClassifier

    n_classes = int(y.max()) + 1

    def fit_predict(train: np.ndarray, predict: Sequence[np.ndarray]) -> list[np.ndarray]:
        k = min(KNN_NEIGHBOURS, len(train))
        fitted = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(x[train], y[train])
        return [
            _all_classes(fitted.predict_proba(x[p]), fitted.classes_, n_classes) for p in predict
        ]

    return fit_predict


def _all_classes(probs: np.ndarray, present: np.ndarray, n_classes: int) -> np.ndarray:
    """``probs`` over the classes a fold saw, widened to every class (0 for the others)."""
    full = np.zeros((len(probs), n_classes), dtype=np.float64)
    full[:, present] = probs
    return full


def cnn_fit_predict(
    files: Sequence[str], y: np.ndarray, image_size: int, train_cfg: object, epochs: int, seed: int
) -> FitPredict:
    """The ``train`` params' model (``train_cfg``), fit ``epochs`` epochs per fold with its
    learning-rate schedule and weight decay, no early stopping (no val side to stop on)."""
    import keras

    from imgclf.pipeline.dataset import make_dataset
    from imgclf.pipeline.model import build_from_params, compile_model, learning_rate_schedule

    n_classes = int(y.max()) + 1
    cfg = train_cfg

    def fit_predict(train: np.ndarray, predict: Sequence[np.ndarray]) -> list[np.ndarray]:
        keras.utils.set_random_seed(seed)
        chosen = [files[i] for i in train]
        ds = make_dataset(chosen, y[train], image_size, cfg.batch_size, True, seed)
        steps = int(np.ceil(len(train) / cfg.batch_size))
        model = build_from_params(image_size, n_classes, cfg, seed)
        schedule = learning_rate_schedule(
            cfg.lr_schedule, cfg.learning_rate, epochs * steps, cfg.warmup_epochs * steps
        )
        compile_model(model, schedule, cfg.weight_decay)
        model.fit(ds, epochs=epochs, verbose=0)
        out = []
        for p in predict:
            batches = make_dataset([files[i] for i in p], y[p], image_size, cfg.batch_size)
            out.append(np.asarray(model.predict(batches, verbose=0), dtype=np.float64))
        keras.backend.clear_session()
        return out

    return fit_predict


@dataclass(frozen=True)
class LabelFindings:
    """cleanlab's verdict on every image's given label."""

    is_issue: np.ndarray  # bool: likely mislabelled
    quality: np.ndarray  # self-confidence of the given label (low = likely wrong)
    suggested: np.ndarray  # the class the probabilities favour
    noise_rate: np.ndarray  # per given class: estimated share of wrong labels


def label_findings(labels: np.ndarray, probs: np.ndarray) -> LabelFindings:
    """Confident learning on out-of-sample ``probs`` (cleanlab ``find_label_issues`` with
    its default prune-by-noise-rate filter, ``get_label_quality_scores``, and the inverse
    noise matrix P(true | given): noise rate = 1 - its diagonal)."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    issue = find_label_issues(labels, probs)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    inverse = estimate_py_and_noise_matrices_from_probabilities(labels, probs)[2]
    noise = 1.0 - np.diag(inverse)
    return LabelFindings(issue, quality, probs.argmax(axis=1), noise)


def outliers(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's out-of-distribution score of each row (``OutOfDistribution`` on the
    features: mean cosine distance to the 10 nearest neighbours, as ``exp(-d)``; low =
    atypical) and whether it lies beyond Datalab's fence."""
    from cleanlab.outlier import OutOfDistribution

    k = min(10, len(features) - 1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Fitting OOD estimator..."
        scores = OutOfDistribution(params={"k": k}).fit_score(features=features)
    distance = -np.log(np.clip(scores, 1e-300, None))  # the fence is scale-free
    q1, q3 = np.percentile(distance, [25, 75])
    fence = q3 + (1.0 / OUTLIER_THRESHOLD - 1.0) * (q3 - q1)
    return scores, distance > fence
