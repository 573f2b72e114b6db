"""Hand-worked inputs the report tests share: two-class probabilities, and the val and test
scores of the positive class whose operating point ``test_operating_point.py`` works out."""

from __future__ import annotations

import numpy as np

NAMES = ["safe", "sensitive"]


def probs_of(pos_scores: list[float]) -> np.ndarray:
    """Probabilities of ``NAMES`` for these scores of ``sensitive``."""
    s = np.array(pos_scores)
    return np.stack([1 - s, s], axis=1)


# val: 10 positives .95, .90, ..., .50 and 4 negatives (the closed forms in the tests are by hand)
POS10 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5]
SCORES10 = np.array([*POS10, 0.88, 0.62, 0.3, 0.2])
TRUTH10 = np.array([True] * 10 + [False] * 4)

# test: positives .95 .58 .52 .45, negatives .9 .6 .1
TEST_SCORES = [0.95, 0.58, 0.52, 0.45, 0.9, 0.6, 0.1]
TEST_TRUTH = [1, 1, 1, 1, 0, 0, 0]
