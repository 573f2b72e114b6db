"""Benchmark 10: the data audit on digits with known label noise and near-duplicates.

Data (:func:`imgclf.testing.noisy.noisy_digits`): scikit-learn's 1,797 handwritten digits
as 32x32 PNGs, one class a digit, then 5% of the files *moved* into a wrong class and 5%
given a *near-duplicate copy* beside them (resized, re-encoded as JPEG, brightened), with a
fixed seed. A copy of a moved file carries its wrong label too: the mislabelled files are
the moved ones and their copies. Everything runs through the project's stages
(``python -m imgclf.pipeline.<stage>``) in a throw-away copy of the project, MLflow on a
temporary SQLite store:

1. ``audit`` with each ``audit.model`` the params schema allows (knn, the default, and
   cnn; quick runs skip cnn): precision and recall of ``metrics/audit/label_issues.csv``
   against the mislabelled files, counting the rows ``audit.exclude: label_issues`` leaves
   out (issues ``label_issue`` or ``near_duplicate_conflict``), and precision@k of its
   ranking, k = the number of mislabelled files;
2. ``split``: the share of (original, copy) pairs split between test and train/val, with
   the near-duplicate grouping (``params.yaml``) vs ``split.near_duplicates.max_distance:
   null`` (byte-identical content only, the split before the audit);
3. ``train`` + ``report`` with ``audit.exclude: label_issues`` vs ``none``: test accuracy
   (``metrics/test.json``) on the same test images, which hold injected noise too;
4. the ``audit`` stage's wall time (the default model) against one ``train`` stage's;
5. in process, the fingerprint's share of ``preprocess``:
   :func:`imgclf.pipeline.preprocess_workers.process_image` vs its body without the
   fingerprint, on 1080p photos (``benchmarks.corpus.make_photo``) as JPEG and PNG.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_model import paired_difference
from benchmarks.common import (
    PROJECT,
    Figure,
    Result,
    Settings,
    Timing,
    fmt,
    interleaved,
    run,
    temp_dir,
)
from benchmarks.corpus import Corpus, make_photo
from imgclf import imaging
from imgclf.imaging import DecodeOptions
from imgclf.params import Audit, Params, load_params
from imgclf.pipeline import audit_model, near_duplicates, suspects
from imgclf.pipeline.preprocess_workers import process_image
from imgclf.testing import images as imagefactory
from imgclf.testing.noisy import Noise, noisy_digits
from imgclf.testing.project import copy_project, set_params

log = logging.getLogger(__name__)

SEED = 7  # of the injected noise
MOVE_FRACTION = COPY_FRACTION = 0.05
QUICK_PER_DIGIT = 40
QUICK_SKIPS = frozenset({"cnn"})  # K trainings: minutes
LABEL_KINDS = suspects.EXCLUDED_KINDS["label_issues"]
FOUND_GOAL = 0.8  # precision and recall of the label issues
QUICK_TRAIN_EPOCHS = 2  # quick mode times one short train (no accuracy comparison)
SIDES = ("train", "val", "test")
STAGE_TIMEOUT = 3600

# the fingerprint's cost: 1080p photos (12 MP would only dilute it), JPEG and PNG
PHOTO_SIZE, QUICK_PHOTO_SIZE = (1920, 1080), (960, 540)
PHOTOS = {"JPEG": 200, "PNG": 50}
QUICK_PHOTOS = {"JPEG": 6, "PNG": 3}
PHOTO_SIZE_OUT = 224
NO_FINGERPRINT = (
    "process_image without the fingerprint (load_rgb, fit_square_content, is_blank, "
    "encode_jpeg: its body before the audit)"
)
BYTE_ONLY = "split.near_duplicates.max_distance: null (byte-identical content only, the old split)"
NO_EXCLUDE = "audit.exclude: none (every train and val image trained on)"
ONE_TRAIN = "one `train` stage run (params.yaml train section)"


# -- what was injected, and how the outputs score against it -----------------------------


@dataclass(frozen=True)
class Truth:
    """The injected noise as the stages' outputs name files (``data/raw/...``)."""

    mislabelled: frozenset[str]  # moved files and the copies of moved files
    true_label: dict[str, str]  # of every mislabelled file
    pairs: list[tuple[str, str]]  # (original, copy)

    def label_of(self, raw_path: str, given: str) -> str:
        return self.true_label.get(raw_path, given)


def truth_of(noise: Noise) -> Truth:
    true = {f"data/raw/{rel}": labels[0] for rel, labels in noise.moved.items()}
    pairs = [(f"data/raw/{o}", f"data/raw/{c}") for o, c in noise.copies]
    true |= {copy: true[orig] for orig, copy in pairs if orig in true}
    return Truth(frozenset(true), true, pairs)


@dataclass(frozen=True)
class Found:
    """How one audit's label issues score against the mislabelled files."""

    flagged: int
    hits: int
    truth: int
    top_hits: int  # mislabelled among the first ``truth`` rows of the ranking
    false_by_kind: dict[str, int]  # flagged but correct: rows by their label kind
    missed_copies: int  # mislabelled copies not flagged
    missed_test: int  # mislabelled test images not flagged
    false_beside_wrong: int  # correct labels flagged in a group holding a mislabelled file

    @property
    def precision(self) -> float | None:
        return self.hits / self.flagged if self.flagged else None

    @property
    def recall(self) -> float | None:
        return self.hits / self.truth if self.truth else None

    @property
    def precision_at_k(self) -> float | None:
        return self.top_hits / self.truth if self.truth else None


def score_issues(rows: list[dict[str, str]], truth: Truth, side_of: dict[str, str]) -> Found:
    """Precision, recall and precision@k of ``label_issues.csv`` rows (ranked) against
    ``truth``; a flagged row has a kind ``audit.exclude: label_issues`` excludes."""
    flagged = {
        r["raw_path"]: LABEL_KINDS.intersection(r["issues"].split(";"))
        for r in rows
        if LABEL_KINDS.intersection(r["issues"].split(";"))
    }
    ranked = [r["raw_path"] for r in sorted(rows, key=lambda r: int(r["rank"]))]
    k = len(truth.mislabelled)
    false_by_kind: dict[str, int] = {}
    for path, kinds in flagged.items():
        if path not in truth.mislabelled:
            kind = "+".join(sorted(kinds))
            false_by_kind[kind] = false_by_kind.get(kind, 0) + 1
    missed = truth.mislabelled - set(flagged)
    copies = {c for _, c in truth.pairs}
    members: dict[str, set[str]] = {}
    for r in rows:  # every member of a group is a row (near_duplicate or a conflict)
        if r["group"]:
            members.setdefault(r["group"], set()).add(r["raw_path"])
    group_of = {r["raw_path"]: r["group"] for r in rows}
    beside_wrong = [
        p
        for p in set(flagged) - truth.mislabelled
        if group_of.get(p) and members[group_of[p]] & truth.mislabelled
    ]
    return Found(
        flagged=len(flagged),
        hits=len(truth.mislabelled & set(flagged)),
        truth=k,
        top_hits=len(truth.mislabelled & set(ranked[:k])),
        false_by_kind=false_by_kind,
        missed_copies=len(missed & copies),
        missed_test=sum(side_of.get(p) == "test" for p in missed),
        false_beside_wrong=len(beside_wrong),
    )


def split_pairs(pairs: list[tuple[str, str]], side_of: dict[str, str]) -> tuple[int, int]:
    """(pairs with one image in test and the other in train or val, pairs with both
    images in the split)."""
    both = [(side_of[a], side_of[b]) for a, b in pairs if a in side_of and b in side_of]
    return sum((a == "test") != (b == "test") for a, b in both), len(both)


def test_fractions(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Each class's share of images on the test side (``metrics/split.json`` counts)."""
    return {
        label: counts["test"][label] / max(1, sum(counts[s][label] for s in SIDES))
        for label in counts["test"]
    }


# -- the stages, in a throw-away copy of the project ------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class Project:
    """A copy of the project with the noisy digits, its stages run as subprocesses."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.env = {
            "IMGCLF_ROOT": str(root),
            "IMGCLF_CACHE_DIR": str(cache),
            "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        }

    def stage(self, name: str) -> float:
        """Run one stage; its wall time in seconds."""
        start = time.perf_counter()
        run(
            self.root,
            sys.executable,
            "-m",
            f"imgclf.pipeline.{name}",
            timeout=STAGE_TIMEOUT,
            extra_env=self.env,
        )
        seconds = time.perf_counter() - start
        log.info("stage %s: %.1f s", name, seconds)
        return seconds

    def set(self, values: dict[str, Any]) -> None:
        set_params(self.root, values)

    def raw_of(self) -> dict[str, str]:
        """Processed path -> raw path (``data/manifest.csv``)."""
        rows = read_csv(self.root / "data" / "manifest.csv")
        return {r["output_path"]: r["raw_path"] for r in rows if r["output_path"]}

    def sides(self) -> dict[str, str]:
        """Raw path -> side of the current split."""
        raw = self.raw_of()
        return {
            raw[r["path"]]: side
            for side in SIDES
            for r in read_csv(self.root / "data" / "split" / f"{side}.csv")
        }

    def file(self, rel: str) -> Path:
        return self.root / rel


@dataclass(frozen=True)
class SplitOutcome:
    split_pairs: int
    pairs: int
    stats: dict[str, int]
    fractions: dict[str, float]
    groups: list[dict[str, str]]  # data/split/groups.csv

    def skew(self) -> str:
        """Why the per-class test fractions spread: the largest group, and how much of the
        class with the highest test fraction sits in groups on the test side."""
        if not self.groups:
            return "no groups"
        members: dict[str, list[dict[str, str]]] = {}
        for r in self.groups:
            members.setdefault(r["group"], []).append(r)
        largest = max(members.values(), key=len)
        labels = Counter(r["label"] for r in largest).most_common()
        top = max(self.fractions, key=self.fractions.__getitem__)
        grouped_test = sum(r["label"] == top and r["side"] == "test" for r in self.groups)
        return (
            f"the largest group holds {len(largest)} images "
            f"({', '.join(f'{n} {label}' for label, n in labels)}) on the "
            f"{largest[0]['side']} side; {grouped_test} of {top}'s test images are in groups"
        )

    @property
    def share(self) -> float | None:
        return self.split_pairs / self.pairs if self.pairs else None


def run_split(project: Project, truth: Truth) -> tuple[SplitOutcome, dict[str, str]]:
    project.stage("split")
    side_of = project.sides()
    metrics = read_json(project.file("metrics/split.json"))
    stats = metrics.pop("near_duplicates")
    split, pairs = split_pairs(truth.pairs, side_of)
    groups = read_csv(project.file("data/split/groups.csv"))
    return SplitOutcome(split, pairs, stats, test_fractions(metrics), groups), side_of


@dataclass(frozen=True)
class AuditOutcome:
    model: str
    found: Found
    seconds: list[float]
    summary: dict[str, Any]


def run_audit(
    project: Project, model: str, truth: Truth, side_of: dict[str, str], reps: int
) -> AuditOutcome:
    project.set({"audit.model": model})
    seconds = [project.stage("audit") for _ in range(reps)]
    rows = read_csv(project.file("metrics/audit/label_issues.csv"))
    found = score_issues(rows, truth, side_of)
    log.info(
        "audit %s: %d flagged, %d of %d mislabelled found (precision %s, recall %s)",
        model, found.flagged, found.hits, found.truth, fmt(found.precision), fmt(found.recall),
    )  # fmt: skip
    return AuditOutcome(
        model, found, seconds, read_json(project.file("metrics/audit/summary.json"))
    )


@dataclass(frozen=True)
class Trained:
    exclude: str
    train_seconds: float
    accuracy: float
    true_accuracy: float  # the same predictions against the true labels of the test images
    trained_on: int
    left_out: int
    left_out_mislabelled: int
    correct: dict[str, bool]  # test path -> right against its given label
    correct_true: dict[str, bool]  # ... against its true label


def train_and_report(project: Project, exclude: str, truth: Truth) -> Trained:
    project.set({"audit.exclude": exclude})
    left = suspects.excluded_paths(project.file("metrics/audit/label_issues.csv"), exclude)
    raw = project.raw_of()
    seconds = project.stage("train")
    project.stage("report")
    meta = read_json(project.file("models/candidate/metadata.json"))
    test = read_json(project.file("metrics/test.json"))
    predictions = read_csv(project.file("metrics/plots/predictions.csv"))
    given = {p["path"]: p["predicted"] == p["actual"] for p in predictions}
    true = {
        p["path"]: p["predicted"] == truth.label_of(raw[p["path"]], p["actual"])
        for p in predictions
    }
    log.info("exclude %s: test accuracy %.4f", exclude, test["accuracy"])
    return Trained(
        exclude,
        seconds,
        float(test["accuracy"]),
        float(np.mean(list(true.values()))),
        sum(meta["class_counts"].values()),
        len(left),
        sum(raw[p] in truth.mislabelled for p in left),
        given,
        true,
    )


# -- why the grouping checks thumbnails as well as pHash -----------------------------------


def fingerprint_facts(
    project: Project, truth: Truth, max_distance: int, min_similarity: float
) -> str:
    """How the copies and the different digits lie in fingerprint space."""
    by_sha = {
        r["sha256"]: near_duplicates.Fingerprint(int(r["phash"], 16), bytes.fromhex(r["thumb"]))
        for r in read_csv(project.file("data/fingerprints.csv"))
    }
    manifest = [r for r in read_csv(project.file("data/manifest.csv")) if r["output_path"]]
    sha_of = {r["raw_path"]: r["sha256"] for r in manifest}
    digit_of: dict[str, set[str]] = {}
    for r in manifest:
        digit_of.setdefault(r["sha256"], set()).add(truth.label_of(r["raw_path"], r["class"]))
    bits, corr = [], []
    for a, b in truth.pairs:
        fa, fb = by_sha[sha_of[a]], by_sha[sha_of[b]]
        bits.append((fa.phash ^ fb.phash).bit_count())
        ta, tb = (np.frombuffer(f.thumb, np.uint8).astype(float) for f in (fa, fb))
        corr.append(float(np.corrcoef(ta, tb)[0, 1]))
    shas = sorted(by_sha)
    found = [by_sha[s] for s in shas]
    parts = []
    for what, similarity in (
        ("pHash alone", -1.0),
        (f"with thumbnails ≥ {min_similarity:g}", min_similarity),
    ):
        pairs = near_duplicates.similar_pairs(found, max_distance, similarity)
        other = sum(digit_of[shas[i]].isdisjoint(digit_of[shas[j]]) for i, j in pairs)
        comp = near_duplicates.components(len(shas), pairs)
        sizes = np.bincount(comp)
        mixed = sum(
            len(set().union(*(digit_of[shas[i]] for i in np.flatnonzero(comp == c)))) > 1
            for c in np.flatnonzero(sizes > 1)
        )
        parts.append(
            f"{what}: {len(pairs):,} linked pairs, {other:,} of them between different true "
            f"digits; largest group {int(sizes.max())}, {mixed} group(s) mixing true digits"
        )
    return (
        f"Fingerprints (data/fingerprints.csv): the {len(bits)} copies lie "
        f"{min(bits)}-{max(bits)} pHash bits (median {statistics.median(bits):g}) from their "
        f"original, thumbnail correlation ≥ {min(corr):.3f}. At max_distance {max_distance}: "
        + "; ".join(parts)
        + "."
    )


# -- the fingerprint's cost in preprocess --------------------------------------------------


def without_fingerprint(data: bytes, options: DecodeOptions) -> tuple[bytes, bool]:
    """``process_image``'s body before the fingerprint (the baseline)."""
    img = imaging.load_rgb(data, options)
    fitted, content = imaging.fit_square_content(img, options)
    blank = imaging.is_blank(content)
    return imaging.encode_jpeg(fitted, options.jpeg_quality), blank


def photos(counts: dict[str, int], size: tuple[int, int]) -> dict[str, list[bytes]]:
    """Synthetic camera photos (``benchmarks.corpus.make_photo``) encoded in memory."""
    out: dict[str, list[bytes]] = {}
    index = 0
    for fmt_name, n in counts.items():
        out[fmt_name] = []
        for _ in range(n):
            img = make_photo(index, size, SEED, 4.5)
            buf = io.BytesIO()
            if fmt_name == "PNG":
                img.save(buf, format="PNG", compress_level=6)
            else:
                img.save(buf, format="JPEG", quality=92)
            out[fmt_name].append(buf.getvalue())
            index += 1
    return out


def per_image_ms(
    fn: Callable[[bytes, DecodeOptions], Any], blobs: list[bytes]
) -> Callable[[], float]:
    options = imagefactory.preprocess_options(size=PHOTO_SIZE_OUT)

    def go() -> float:
        start = time.perf_counter()
        for blob in blobs:
            fn(blob, options)
        return 1000 * (time.perf_counter() - start) / len(blobs)

    return go


def fingerprint_cost(settings: Settings) -> tuple[dict[str, dict[str, Timing]], str]:
    """Per format, ms per image of ``process_image`` (ours) and without the fingerprint."""
    size = QUICK_PHOTO_SIZE if settings.quick else PHOTO_SIZE
    counts = QUICK_PHOTOS if settings.quick else PHOTOS
    start = time.perf_counter()
    blobs = photos(counts, size)
    made = time.perf_counter() - start
    megabytes = {k: sum(map(len, v)) / len(v) / 2**20 for k, v in blobs.items()}
    log.info("fingerprint cost: %s photos of %dx%d made in %.1f s", counts, *size, made)
    out = {}
    for fmt_name, items in blobs.items():
        out[fmt_name] = interleaved(
            {
                "ours": per_image_ms(process_image, items),
                "baseline": per_image_ms(without_fingerprint, items),
                "fingerprint": per_image_ms(lambda b, _: near_duplicates.fingerprint(b), items),
            },
            settings.reps,
        )
    what = ", ".join(f"{n} {k} ({megabytes[k]:.2f} MB each)" for k, n in counts.items())
    return out, f"{what} of {size[0]}x{size[1]}"


SCALE = (2_000, 20_000)  # synthetic images: the audit's size-dependent steps at each
QUICK_SCALE = (500, 2_000)


def scale_seconds(n: int, seed: int, folds: int, feature_size: int) -> dict[str, float]:
    """Seconds of the audit's steps that grow with the data, on ``n`` synthetic images (10
    classes, random fingerprints and pixel features): the near-duplicate search (all
    pairs, in blocks), the folds, the knn out-of-sample probabilities, cleanlab's label
    findings and its outlier scores."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64)
    thumbs = rng.integers(0, 256, (n, near_duplicates.THUMB_SIDE**2), dtype=np.uint8)
    prints = [
        near_duplicates.Fingerprint(int(h), t.tobytes())
        for h, t in zip(hashes, thumbs, strict=True)
    ]
    y = rng.integers(0, 10, n)
    x = rng.random((n, feature_size * feature_size * 3), dtype=np.float32)
    out: dict[str, float] = {}
    start = time.perf_counter()
    pairs = near_duplicates.similar_pairs(prints, 8, 0.98)
    near_duplicates.components(n, pairs)
    out["near-duplicate search"] = time.perf_counter() - start
    start = time.perf_counter()
    held = n - n // 10  # the rest plays the test side
    fold = audit_model.fold_of(y[:held], [str(i) for i in range(held)], folds, seed)
    probs = audit_model.out_of_sample_probs(
        fold, np.arange(held, n), 10, audit_model.knn_fit_predict(x, y)
    )
    out["folds + knn probabilities"] = time.perf_counter() - start
    start = time.perf_counter()
    audit_model.label_findings(y, np.concatenate([probs.train_val, probs.test]))
    audit_model.outliers(x)
    out["cleanlab findings + outliers"] = time.perf_counter() - start
    return out


# -- the benchmark --------------------------------------------------------------------------


def audit_models(default: str, quick: bool) -> list[str]:
    """Every ``audit.model`` the params schema allows (quick: not cnn), the default last:
    its ``label_issues.csv`` is the one ``train`` and ``report`` then exclude."""
    allowed = typing.get_args(Audit.model_fields["model"].annotation)
    chosen = [m for m in allowed if not (quick and m in QUICK_SKIPS)]
    return sorted(chosen, key=lambda m: m == default)


def _share(n: int, total: int) -> str:
    return f"{n} of {total}" + (f" ({100 * n / total:.0f}%)" if total else "")


def _range(values: dict[str, float]) -> str:
    low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    return f"{values[low]:.3f} ({low}) to {values[high]:.3f} ({high})"


def _stats(stats: dict[str, int]) -> str:
    return (
        f"{stats['groups']} groups of {stats['images']} images (largest {stats['largest']}), "
        f"{stats['cross_class_groups']} spanning classes ({stats['cross_class_images']} images)"
    )


@dataclass
class Measured:
    """Everything one run of the benchmark measured."""

    params: Params
    noise: Noise
    truth: Truth
    side_of: dict[str, str]
    byte_only: SplitOutcome
    grouped: SplitOutcome
    facts: str
    audits: dict[str, AuditOutcome]
    trained: dict[str, Trained]
    train_seconds: float
    preprocess_seconds: float
    cost: dict[str, dict[str, Timing]]
    photo_line: str
    per_digit: int | None
    scale: dict[int, dict[str, float]]


def bench(settings: Settings, corpus: Corpus | None) -> Result:
    m = measure(settings)
    result = Result("audit", "Data audit")
    result.figures = figures(m, settings)
    result.notes = notes(m, settings)
    return result


def measure(settings: Settings) -> Measured:
    """Inject the noise into a project copy, then run the stages on it (and time the
    fingerprint on photos)."""
    params = load_params(PROJECT / "params.yaml")
    nd = params.split.near_duplicates
    per_digit = QUICK_PER_DIGIT if settings.quick else None
    default = params.audit.model
    cost, photo_line = fingerprint_cost(settings)
    sizes = QUICK_SCALE if settings.quick else SCALE
    scale = {
        n: scale_seconds(n, SEED, params.audit.folds, params.audit.feature_size) for n in sizes
    }
    log.info("audit steps at scale: %s", scale)
    with temp_dir(settings, "audit") as tmp:
        project = Project(copy_project(tmp / "repo"), tmp / "cache")
        noise = noisy_digits(
            project.file("data/raw"), MOVE_FRACTION, COPY_FRACTION, SEED, per_digit
        )
        truth = truth_of(noise)
        log.info(
            "noisy digits: %d moved, %d copies, %d mislabelled files",
            len(noise.moved), len(noise.copies), len(truth.mislabelled),
        )  # fmt: skip
        preprocess_seconds = project.stage("preprocess")
        project.set({"split.near_duplicates.max_distance": None})
        byte_only, _ = run_split(project, truth)
        project.set({"split.near_duplicates.max_distance": nd.max_distance})
        grouped, side_of = run_split(project, truth)
        facts = (
            fingerprint_facts(project, truth, nd.max_distance, nd.min_similarity)
            if nd.max_distance is not None
            else "params.yaml groups byte-identical images only: no fingerprint facts."
        )
        audits = {
            model: run_audit(
                project, model, truth, side_of, settings.reps if model == default else 1
            )
            for model in audit_models(default, settings.quick)
        }
        trained: dict[str, Trained] = {}
        if settings.quick:  # one short train, for its time only
            project.set({"train.epochs": QUICK_TRAIN_EPOCHS})
            train_seconds = project.stage("train")
        else:
            for exclude in ("none", "label_issues"):
                trained[exclude] = train_and_report(project, exclude, truth)
            train_seconds = trained["none"].train_seconds
    return Measured(
        params, noise, truth, side_of, byte_only, grouped, facts, audits, trained,
        train_seconds, preprocess_seconds, cost, photo_line, per_digit, scale,
    )  # fmt: skip


def figures(m: Measured, settings: Settings) -> list[Figure]:
    """The table rows: per audit model, the split, the accuracy, the times."""
    default, grouped, byte_only = m.params.audit.model, m.grouped, m.byte_only
    k = len(m.truth.mislabelled)
    out: list[Figure] = []
    for model, a in m.audits.items():
        name = f"audit.model {model}{' (default)' if model == default else ''}"
        out += [
            Figure(f"label-issue precision, {name}", "", a.found.precision, None,
                   goal_on="ours", goal_value=FOUND_GOAL),
            Figure(f"label-issue recall, {name}", "", a.found.recall, None,
                   goal_on="ours", goal_value=FOUND_GOAL),
            Figure(f"precision@{k} of the ranking, {name}", "", a.found.precision_at_k, None),
        ]  # fmt: skip
    out += [
        Figure(
            f"share of the {grouped.pairs} (original, copy) pairs split between test and "
            "train/val",
            "",
            grouped.share,
            byte_only.share,
            BYTE_ONLY,
            goal_on="ours",
            goal_op="<=",
            goal_value=0.0,
        ),
        Figure(
            "lowest per-class test fraction", "", min(grouped.fractions.values()),
            min(byte_only.fractions.values()), BYTE_ONLY,
        ),
        Figure(
            "highest per-class test fraction", "", max(grouped.fractions.values()),
            max(byte_only.fractions.values()), BYTE_ONLY,
        ),
    ]  # fmt: skip
    if m.trained:
        none, excl = m.trained["none"], m.trained["label_issues"]
        out += [
            Figure(
                "test accuracy (metrics/test.json), audit.exclude: label_issues", "",
                excl.accuracy, none.accuracy, NO_EXCLUDE,
            ),
            Figure(
                "the same predictions scored against the true test labels", "",
                excl.true_accuracy, none.true_accuracy, NO_EXCLUDE,
            ),
        ]  # fmt: skip
    timed = m.audits[default]
    out.append(
        Figure(
            f"`audit` stage wall time, audit.model {default}",
            "s",
            statistics.median(timed.seconds),
            m.train_seconds,
            ONE_TRAIN,
            ours_samples=timed.seconds,
            baseline_samples=[m.train_seconds],
        )
    )
    size = QUICK_PHOTO_SIZE if settings.quick else PHOTO_SIZE
    for fmt_name, t in m.cost.items():
        out.append(
            Figure(
                f"preprocess of one {size[1]}p {fmt_name}, process_image with the fingerprint",
                "ms",
                t["ours"].median,
                t["baseline"].median,
                NO_FINGERPRINT,
                ours_samples=t["ours"].samples,
                baseline_samples=t["baseline"].samples,
            )
        )

    small, large = sorted(m.scale)
    for step, seconds in m.scale[large].items():
        out.append(
            Figure(
                f"audit step at {large:,} synthetic images: {step}",
                "s",
                seconds,
                m.scale[small][step],
                f"the same step at {small:,} synthetic images",
            )
        )
    return out


def notes(m: Measured, settings: Settings) -> list[str]:
    """The lines under the table: the data, each audit, the split, training, the cost."""
    params, noise, truth, side_of = m.params, m.noise, m.truth, m.side_of
    nd, test_size, default = (
        params.split.near_duplicates,
        params.split.test_size,
        params.audit.model,
    )
    audits, grouped, byte_only, trained = m.audits, m.grouped, m.byte_only, m.trained
    k, images, per_digit = len(truth.mislabelled), len(side_of), m.per_digit
    out: list[str] = []
    n_test_wrong = sum(side_of.get(p) == "test" for p in truth.mislabelled)
    subset = "" if per_digit is None else f", the first {per_digit} of each digit"
    out += [
        f"Data: {images:,} images (scikit-learn digits{subset}, 10 classes): "
        f"{len(noise.moved)} moved to a wrong class ({MOVE_FRACTION:.0%}), "
        f"{len(noise.copies)} near-duplicate copies ({COPY_FRACTION:.0%}); "
        f"{k} mislabelled files (the moved ones and {k - len(noise.moved)} copies of moved "
        f"ones), {n_test_wrong} of them on the test side; noise seed {SEED}. Each figure is "
        f"one run (the {default} audit {settings.reps}), the stages as subprocesses; preprocess "
        f"took {m.preprocess_seconds:.0f} s.",
    ]
    for model, a in audits.items():
        f = a.found
        false = ", ".join(f"{n} {kind}" for kind, n in sorted(f.false_by_kind.items())) or "none"
        out.append(
            f"audit.model {model}: {f.flagged} rows flagged (label_issue or "
            f"near_duplicate_conflict), {f.hits} of the {f.truth} mislabelled files among them; "
            f"correct labels flagged: {false} ({f.false_beside_wrong} of them grouped with a "
            "mislabelled near-duplicate whose wrong label ties or outvotes theirs); missed: "
            f"{f.truth - f.hits} (copies of moved files: {f.missed_copies}; on the test side: "
            f"{f.missed_test}); top {k} of the ranking: "
            f"{f.top_hits} mislabelled; {a.summary['suspects']} suspects in all "
            f"({', '.join(f'{n} {kind}' for kind, n in a.summary['by_kind'].items())}); "
            f"cross-validated accuracy {a.summary['cv_accuracy']:.3f}; "
            f"{statistics.median(a.seconds):.0f} s."
        )
    out += [
        f"Split with grouping (max_distance {nd.max_distance}, min_similarity "
        f"{nd.min_similarity:g}): {_share(grouped.split_pairs, grouped.pairs)} pairs split; "
        f"{_stats(grouped.stats)}; per-class test fraction {_range(grouped.fractions)} "
        f"(test_size {test_size:g}): {grouped.skew()} (a group goes to one side whole).",
        f"Split byte-identical only: {_share(byte_only.split_pairs, byte_only.pairs)} pairs "
        f"split (a pair's sides independent: about 2 x {test_size:g} x {1 - test_size:g} = "
        f"{2 * test_size * (1 - test_size):.2f} expected); {_stats(byte_only.stats)}; per-class "
        f"test fraction {_range(byte_only.fractions)}.",
        m.facts,
    ]
    if trained:
        none, excl = trained["none"], trained["label_issues"]
        out.append(
            f"Training: params.yaml train section, the {default} audit's label_issues.csv; "
            f"audit.exclude label_issues left out {excl.left_out} train/val images "
            f"({excl.left_out_mislabelled} of them mislabelled), training on "
            f"{excl.trained_on} instead of {none.trained_on} (train side); train took "
            f"{excl.train_seconds:.0f} s vs {none.train_seconds:.0f} s. Both runs score the "
            f"same test images, whose labels hold the injected noise too ({n_test_wrong} "
            "mislabelled): test.json counts a right answer to a wrong label as a mistake, so "
            "the second accuracy row scores the same predictions (test.json's decision at the "
            "operating threshold) against the true labels."
        )
    else:
        out.append(
            f"Quick run: no cnn audit and no accuracy comparison; the train time is one "
            f"{QUICK_TRAIN_EPOCHS}-epoch train, not params.yaml's."
        )
    fp = {k: v["fingerprint"].median for k, v in m.cost.items()}
    out.append(
        f"Fingerprint cost: {m.photo_line} (benchmarks.corpus.make_photo, JPEG q92, PNG level "
        f"6), made in memory; one process, output {PHOTO_SIZE_OUT} px with params.yaml's "
        "other preprocess settings; the three alternate rep by rep; the fingerprint alone "
        f"(near_duplicates.fingerprint): "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in fp.items())
        + ". A JPEG's fingerprint decodes in draft mode (1/8 scale); a PNG cannot be drafted, "
        "so its fingerprint decodes the whole file a second time."
    )
    small, large = sorted(m.scale)
    total = {n: sum(steps.values()) for n, steps in m.scale.items()}
    out.append(
        f"Scale: the steps that grow with the data, on {small:,} and {large:,} synthetic "
        f"images (10 classes, random fingerprints and {m.params.audit.feature_size}x"
        f"{m.params.audit.feature_size} RGB features, {m.params.audit.folds} folds, knn): "
        f"{total[small]:.1f} s and {total[large]:.1f} s in all, {total[large] / total[small]:.0f}x "
        f"for {large // small}x the images: the near-duplicate search compares all pairs (in "
        "blocks of bounded memory) and cleanlab's outlier score finds every image's nearest "
        "neighbours, so both grow about with the square of the images."
    )
    out.append(
        meaning(audits, grouped, byte_only, trained, audits[default], m.train_seconds, m.cost)
    )
    return out


def accuracy_change(trained: dict[str, Trained]) -> list[tuple[float, float]]:
    """Test accuracy with the label issues left out minus without, and its 95%
    half-width, paired over the same test images: against the given labels, then the true."""
    none, excl = trained["none"], trained["label_issues"]
    out = []
    for field in ("correct", "correct_true"):
        a, b = getattr(excl, field), getattr(none, field)
        paths = sorted(a)
        out.append(
            paired_difference(np.array([a[p] for p in paths]), np.array([b[p] for p in paths]))
        )
    return out


def meaning(
    audits: dict[str, AuditOutcome],
    grouped: SplitOutcome,
    byte_only: SplitOutcome,
    trained: dict[str, Trained],
    timed: AuditOutcome,
    train_seconds: float,
    cost: dict[str, dict[str, Timing]],
) -> str:
    """The "what this means" paragraph, from the figures."""

    def met(a: AuditOutcome) -> bool:
        p, r = a.found.precision, a.found.recall
        return p is not None and r is not None and p >= FOUND_GOAL and r >= FOUND_GOAL

    good = [m for m, a in audits.items() if met(a)]
    bad = [m for m in audits if m not in good]
    parts = [
        "What this means: "
        + (
            f"the audit finds the injected label errors with precision and recall ≥ "
            f"{FOUND_GOAL:g} with {', '.join(good)}"
            if good
            else f"no audit model reaches precision and recall {FOUND_GOAL:g}"
        )
        + (f"; missed with {', '.join(bad)} (figures above)" if bad and good else "")
        + "."
    ]
    parts.append(
        f"With grouping {grouped.split_pairs} of {grouped.pairs} near-duplicate pairs straddle "
        f"test and train/val, against {byte_only.split_pairs} byte-identical only, so a copy "
        "no longer leaks a test image into training."
        if grouped.split_pairs == 0
        else f"With grouping {grouped.split_pairs} of {grouped.pairs} near-duplicate pairs "
        f"still straddle test and train/val (missed; {byte_only.split_pairs} byte-identical "
        "only)."
    )
    spread = {
        name: max(o.fractions.values()) - min(o.fractions.values())
        for name, o in (("grouped", grouped), ("bytes", byte_only))
    }
    if spread["grouped"] > spread["bytes"]:
        parts.append(
            "The price: a group goes to one side whole, and on these 32 px digits many scans "
            "of one digit are near-duplicates of each other, so per-class test fractions "
            f"spread from {min(grouped.fractions.values()):.2f} to "
            f"{max(grouped.fractions.values()):.2f} (byte-identical only "
            f"{min(byte_only.fractions.values()):.2f} to {max(byte_only.fractions.values()):.2f})."
        )
    if trained:
        (d, half), (t, true_half) = accuracy_change(trained)
        parts.append(
            f"Leaving the flagged train/val images out changes test accuracy by {d:+.3f} "
            f"± {half:.3f} ({t:+.3f} ± {true_half:.3f} against the true labels; 95%, paired "
            "over the test images), one training of one seed each: a change inside that "
            "band, or of the size a different seed gives, is no evidence either way."
        )
    ratio = statistics.median(timed.seconds) / train_seconds
    jpeg, png = (cost[k]["ours"].median / cost[k]["baseline"].median for k in ("JPEG", "PNG"))
    parts.append(
        f"A {timed.model} audit costs {ratio:.2f} of a training run; the fingerprint makes "
        f"preprocess {jpeg:.2f}x (JPEG) and {png:.2f}x (PNG) as slow per image."
    )
    return " ".join(parts)
