"""Finding the best experiment of a sweep in ``dvc exp show --json`` (its shape as DVC 3
writes it: a baseline commit with its experiments under ``experiments[].revs``)."""

from __future__ import annotations

import pytest

from imgclf.experiments import best, parse_show, table

pytestmark = pytest.mark.unit


def entry(name: str, accuracy: float | None, verdict: str | None, epochs: int, error=None):
    metrics = {}
    if accuracy is not None:
        metrics["metrics/test.json"] = {"data": {"accuracy": accuracy, "recall": 1.0}}
        metrics["metrics/promote.json"] = {"data": {"promoted": verdict == "promoted"}}
        metrics["metrics/promote.json"]["data"]["verdict"] = verdict
    params = {"params.yaml": {"data": {"train": {"epochs": epochs, "seed": None}}}}
    return {
        "rev": f"{name}-sha",
        "name": name,
        "data": {"metrics": metrics, "params": params},
        "error": error,
    }


SHOW = [
    {"rev": "workspace", "name": None, "data": {"metrics": {}}, "error": None},
    entry("main", 0.95, "promoted", 40)
    | {
        "experiments": [
            {"revs": [entry("big-sweep", 0.97, "promoted", 60)]},
            {"revs": [entry("worse-one", 0.93, "regression", 3)]},
            {"revs": [entry("higher-but-gated", 0.99, "below_min_value", 80)]},
            {"revs": [entry("broken", None, None, 9, {"type": "ReproductionError", "msg": "x"})]},
            {"revs": [entry("tied", 0.97, "promoted", 50)]},
        ]
    },
]


def test_the_best_is_the_highest_promoted_experiment():
    [(base, exps)] = list(parse_show(SHOW))
    assert base.name == "main" and base.value("accuracy") == 0.95
    assert [e.name for e in exps] == [
        "big-sweep", "worse-one", "higher-but-gated", "broken", "tied",
    ]  # fmt: skip
    assert exps[0].changed == {"train.epochs": 60}
    assert exps[3].error == "x" and exps[3].test == {}
    chosen = best(exps, "accuracy")
    assert chosen is not None and chosen.name == "big-sweep"  # the first of a tie
    assert best(exps, "roc_auc") is None  # no experiment has it
    assert best([exps[1], exps[2]], "accuracy") is None  # none was promoted


def test_the_table_shows_each_experiments_own_figures_and_verdict():
    [(base, exps)] = list(parse_show(SHOW))
    assert table(base, exps[:4], "accuracy").splitlines() == [
        "experiment                 accuracy  verdict          params changed",
        "main                         0.9500  promoted",
        "big-sweep                    0.9700  promoted         train.epochs=60",
        "worse-one                    0.9300  regression       train.epochs=3",
        "higher-but-gated             0.9900  below_min_value  train.epochs=80",
        "broken                            -  failed           train.epochs=9",
    ]
