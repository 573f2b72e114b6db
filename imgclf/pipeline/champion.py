"""Champion / challenger: is the candidate at least as good as the bundle it would replace?

``promote`` compares the candidate's test ``promote.metric`` with the served bundle's
(``models/bundle.zip``, the champion) **on the same test images**: the figure recorded in
the bundle when it was measured on the same data (same ``data_hash``), else the champion
re-scored on today's test split at its own operating threshold, as serving decides. When
the two cannot be compared (no bundle yet, other classes, another input size), the verdict
says why and the absolute gate decides alone. :func:`decide` turns the gate and the
comparison into the one verdict ``metrics/promote.json`` records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.bundle import Bundle

log = logging.getLogger(__name__)

# promote.json "verdict" values
PROMOTED = "promoted"
BELOW_GATE = "below_min_value"
REGRESSION = "regression"


@dataclass(frozen=True)
class Champion:
    """The served bundle's figure on the candidate's test images, or why there is none."""

    value: float | None  # None: not comparable (``how`` says why)
    how: str  # "recorded", "re-scored on today's test split", or the reason it is not compared
    md5: str | None = None  # the champion bundle's md5 (None: no bundle)

    @property
    def comparable(self) -> bool:
        return self.value is not None


def not_comparable(candidate_meta: dict[str, Any], bundle: Bundle) -> str | None:
    """Why ``bundle`` cannot be scored like the candidate (None when it can): other classes
    or another input size."""
    if bundle.class_names != list(candidate_meta["class_names"]):
        return (
            f"the classes differ (served {bundle.class_names}, candidate "
            f"{list(candidate_meta['class_names'])})"
        )
    if int(bundle.info["image_size"]) != int(candidate_meta["image_size"]):
        return (
            f"the input size differs (served {bundle.info['image_size']} px, candidate "
            f"{candidate_meta['image_size']} px)"
        )
    return None


def recorded_value(bundle: Bundle, candidate_meta: dict[str, Any], metric: str) -> float | None:
    """The bundle's own test figure when it was measured on the candidate's data (same
    ``data_hash``: the same split lists, decode settings and exclusions), else None."""
    if bundle.info.get("data_hash") != candidate_meta.get("data_hash"):
        return None
    value = (bundle.info.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


def decide(gate: dict[str, Any], champion: Champion, max_regression: float) -> dict[str, Any]:
    """``metrics/promote.json``: ``promoted``, ``verdict`` (:data:`PROMOTED`,
    :data:`BELOW_GATE` or :data:`REGRESSION`), the metric, the candidate's and the
    champion's figures, ``max_regression`` and ``reason`` (one line in words)."""
    metric, value = gate["metric"], gate["value"]
    out = {"metric": metric, "candidate": value, "champion": champion.value}
    out |= {"min_value": gate["min_value"], "max_regression": max_regression}
    if not gate["passed"]:
        return {"promoted": False, "verdict": BELOW_GATE, **out, "reason": gate["reason"]}
    if not champion.comparable:
        reason = f"passed the gate; not compared with the served bundle: {champion.how}"
        return {"promoted": True, "verdict": PROMOTED, **out, "reason": reason}
    floor = round(champion.value - max_regression, 6)
    words = (
        f"test {metric} {value} vs the served bundle's {champion.value} ({champion.how}, "
        f"bundle md5 {champion.md5})"
    )
    if float(value) >= floor - 1e-9:
        return {"promoted": True, "verdict": PROMOTED, **out, "reason": f"{words}: not worse"}
    reason = (
        f"REGRESSION: {words}: worse by {round(champion.value - float(value), 6)} > "
        f"promote.max_regression {max_regression:g}; to promote it anyway rerun with "
        f"-S promote.max_regression={round(champion.value - float(value) + 0.0005, 3):g}"
    )
    return {"promoted": False, "verdict": REGRESSION, **out, "reason": reason}


def score_bundle(
    bundle: Bundle,
    files: list[str],
    labels: np.ndarray,
    batch_size: int,
) -> dict[str, Any]:
    """The bundle's test figures on these images (``labels``: class indices in the bundle's
    order), decided at its own operating threshold as serving does."""
    from imgclf import runtimes
    from imgclf.pipeline.dataset import predict_probs
    from imgclf.pipeline.operating_point import decisions_at_threshold
    from imgclf.pipeline.report_metrics import compute_metrics

    op, names = bundle.info["operating_point"], bundle.class_names
    model = runtimes.load_keras(bundle.model_bytes)
    probs = predict_probs(model, files, int(bundle.info["image_size"]), batch_size)
    positive = names.index(op["positive_class"])
    decided = decisions_at_threshold(probs, positive, float(op["threshold"]))
    return compute_metrics(labels, decided, probs, names, op["positive_class"])
