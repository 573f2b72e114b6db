"""Stage ``promote``: the quality gate between a trained candidate and what is served.

The candidate (``models/candidate/``) passes when its test ``promote.metric`` (measured by
``report`` at the operating threshold, as serving decides) is at least
``promote.min_value``. Then, and only then:

1. ``models/bundle.zip`` is written atomically (see :mod:`imgclf.bundle`): the server,
   watching that one file, swaps to it in one step; while ``dvc repro`` or ``dvc exp run``
   is half-way, and whenever the gate fails, the previously promoted bundle stays. Its
   bytes depend on its content only; the run-specific facts (MLflow run, git commit,
   registry version) go beside it, to ``models/bundle.run.json``, which DVC does not hash;
2. the bundle is registered in MLflow as a new version of ``mlflow.registered_model``, and
   gets the ``mlflow.champion_alias`` when it beats the current champion on the metric.

A failing gate fails the stage with one line (the MLflow run ends FAILED, tagged
``quality_gate=failed``); nothing is written or registered.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from imgclf.bundle import Bundle, BundleError, read_run_facts, write_bundle, write_run_facts
from imgclf.config import PATHS, StageError, load_params, setup_logging, stage_main
from imgclf.params import Mlflow, Promote
from imgclf.pipeline.stage_outputs import read_json

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "macro_f1", "roc_auc", "pr_auc")


def gate_verdict(test_metrics: dict[str, Any], cfg: Promote) -> dict[str, Any]:
    """The gate verdict: ``{"metric", "min_value", "value", "passed"}`` (an undefined
    metric, e.g. an AUC with a class missing from test, does not pass)."""
    value = test_metrics.get(cfg.metric)
    passed = value is not None and float(value) >= cfg.min_value
    return {"metric": cfg.metric, "min_value": cfg.min_value, "value": value, "passed": passed}


def check_gate(verdict: dict[str, Any]) -> None:
    """A failed verdict is a :class:`StageError` saying what stays served."""
    if not verdict["passed"]:
        raise StageError(
            f"QUALITY GATE FAILED: test {verdict['metric']} {verdict['value']} < "
            f"promote.min_value {verdict['min_value']}; the candidate is neither promoted "
            f"nor registered, and {describe_promoted()}"
        )


def bundle_info(
    meta: dict[str, Any],
    operating_point: dict[str, Any],
    test_metrics: dict[str, Any],
    verdict: dict[str, Any],
) -> dict[str, Any]:
    """``bundle.json``: everything serving needs beside the model, and where it came from."""
    return {
        "class_names": meta["class_names"],
        "image_size": meta["image_size"],
        "decode": meta["decode"],
        "backbone": meta["backbone"],
        "operating_point": {
            k: operating_point[k] for k in ("positive_class", "threshold", "target_recall")
        },
        "gate": verdict,
        "metrics": {k: test_metrics.get(k) for k in SUMMARY_METRICS},
        "data_hash": meta["data_hash"],
        "params_digest": meta["params_digest"],
    }


def describe_promoted() -> str:
    """What ``models/bundle.zip`` holds now, in words (for the gate's failure line)."""
    try:
        current = Bundle.read(PATHS.bundle)
    except BundleError as exc:
        return f"no bundle is promoted yet ({exc})"
    g = current.info["gate"]
    run = read_run_facts(PATHS.bundle, current.md5).get("run_name") or f"md5 {current.md5}"
    return f"models/bundle.zip keeps the bundle promoted by {run} ({g['metric']} {g['value']})"


def promote_bundle(info: dict[str, Any]) -> str:
    """Write ``models/bundle.zip`` (the candidate's model and ``info``); returns its md5."""
    md5 = write_bundle(PATHS.bundle, PATHS.model_file, info)
    gate = info["gate"]
    log.info(
        "quality gate passed (test %s %s >= %s): promoted models/bundle.zip (md5 %s)",
        gate["metric"], gate["value"], gate["min_value"], md5,
    )  # fmt: skip
    return md5


def register(run: Any, ml: Mlflow, verdict: dict[str, Any]) -> dict[str, Any] | None:
    """Register ``models/bundle.zip`` as a new version of ``mlflow.registered_model``, with
    ``mlflow.champion_alias`` when it beats the champion's metric, and tag the run.
    Returns ``{"name", "version", "alias", "champion_value", "champion_version"}``; None
    without a registry (``registered_model: null``) or when MLflow is unreachable."""
    if not ml.registered_model:
        return None
    registered = run.register_bundle(
        PATHS.bundle, ml.registered_model, verdict["metric"], float(verdict["value"]),
        ml.champion_alias,
    )  # fmt: skip
    if not registered:
        return None
    tags = {k: v for k, v in registered.items() if v is not None}
    run.set_tags({"registered_model": ml.registered_model, **tags})
    holder = (
        "this version"
        if registered["alias"]
        else f"kept by version {registered['champion_version']}"
    )
    log.info(
        "registered %s version %s; @%s: %s (%s %s)",
        ml.registered_model, registered["version"], ml.champion_alias, holder,
        verdict["metric"], registered["champion_value"],
    )  # fmt: skip
    return {"name": ml.registered_model, **registered}


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    meta = read_json(PATHS.model_metadata, written_by="train")
    test_metrics = read_json(PATHS.test_metrics, written_by="report")
    op = read_json(PATHS.operating_point, written_by="report")
    verdict = gate_verdict(test_metrics, params.promote)
    from imgclf import tracking

    link = tracking.read_run_link()
    run = tracking.resume(link, params.mlflow.experiment)
    with tracking.taken(run):
        run.log_params(tracking.flatten({"promote": params.promote.model_dump()}))
        run.set_tags({"quality_gate": "passed" if verdict["passed"] else "failed"})
        check_gate(verdict)
        md5 = promote_bundle(bundle_info(meta, op, test_metrics, verdict))
        facts = {"bundle_md5": md5, "mlflow_run_id": run.run_id if run.ok else None}
        facts |= {"run_name": link["run_name"], "git_commit": link.get("git_commit")}
        write_run_facts(PATHS.bundle, facts)
        registered = register(run, params.mlflow, verdict)
        if registered:
            write_run_facts(PATHS.bundle, facts | {"registered": registered})
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
