"""Stage ``promote``: the quality gate and the champion race between a trained candidate
and what is served.

The candidate (``models/candidate/``) is promoted when

1. its test ``promote.metric`` (measured by ``report`` at the operating threshold, as
   serving decides) is at least ``promote.min_value`` (the absolute gate), and
2. on the same test images it is not worse than the served bundle (``models/bundle.zip``,
   the champion) by more than ``promote.max_regression`` (:mod:`~imgclf.pipeline.champion`;
   ``-S promote.max_regression=1`` lets any candidate through the gate replace it).

Then, and only then:

1. ``models/bundle.zip`` is written atomically (see :mod:`imgclf.bundle`): the server,
   watching that one file, swaps to it in one step; while ``dvc repro`` or ``dvc exp run``
   is half-way, and whenever the candidate is not promoted, the served bundle stays. Its
   bytes depend on its content only; the run-specific facts (MLflow run, git commit,
   registry version) go beside it, to ``models/bundle.run.json``, which DVC does not hash;
2. the bundle is registered in MLflow as a new version of ``mlflow.registered_model`` and
   gets the ``mlflow.champion_alias`` (the served bundle is the champion).

Either way ``metrics/promote.json`` records the verdict and the champion's figure (and
``metrics/promote_detail.json`` both figures, the bounds and the reason), so an experiment
that was not promoted shows its own figures and verdict in ``dvc exp show``. A candidate
that is not promoted ends the stage successfully (with a ``QUALITY GATE FAILED`` or
``REGRESSION`` warning line) while a bundle stays served; with none promoted yet, it fails
the stage in one line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from imgclf.bundle import Bundle, BundleError, read_run_facts, write_bundle, write_run_facts
from imgclf.config import PATHS, StageError, load_params, setup_logging, stage_main
from imgclf.files import write_json
from imgclf.params import Mlflow, Params, Promote
from imgclf.pipeline.champion import (
    Champion,
    decide,
    not_comparable,
    recorded_value,
    score_bundle,
)
from imgclf.pipeline.dataset import encode_labels, read_list
from imgclf.pipeline.stage_outputs import read_json

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "macro_f1", "roc_auc", "pr_auc")
# the verdict's figures metrics/promote.json holds (dvc exp show columns; the candidate's
# figure is test.json's); metrics/promote_detail.json has them all, with the reason
HEADLINE = ("promoted", "verdict", "champion")
# gate metrics that depend on the decision rule (the AUCs do not)
DECIDED_METRICS = ("accuracy", "macro_f1")


def gate_verdict(
    test_metrics: dict[str, Any], cfg: Promote, argmax: dict[str, Any], op: dict[str, Any]
) -> dict[str, Any]:
    """The absolute gate: ``{"metric", "min_value", "value", "passed", "reason"}`` (an
    undefined metric, e.g. an AUC with a class missing from test, does not pass). A
    failure's ``reason`` names the figure at the threshold and by argmax (``argmax``: the
    argmax figures of ``report/test_detail.json``), the threshold, the val positives it
    rests on, and what to change."""
    value = test_metrics.get(cfg.metric)
    passed = value is not None and float(value) >= cfg.min_value
    verdict = {"metric": cfg.metric, "min_value": cfg.min_value, "value": value, "passed": passed}
    if passed:
        return verdict | {"reason": f"test {cfg.metric} {value} >= promote.min_value"}
    return verdict | {"reason": gate_failure(verdict, argmax.get(cfg.metric), op)}


def gate_failure(verdict: dict[str, Any], argmax_value: float | None, op: dict[str, Any]) -> str:
    """``QUALITY GATE FAILED: ...``: the figure at the operating threshold and by argmax, the
    threshold and what it rests on, and whether the threshold or the model should change."""
    metric, floor = verdict["metric"], verdict["min_value"]
    vouched = "" if op["bound_met"] else ", TARGET NOT VOUCHED FOR"
    where = (
        f"at the operating threshold ({op['positive_class']} >= {op['threshold']:.6g}, chosen "
        f"on {op['val']['n_positive']} val positives{vouched})"
    )
    head = (
        f"QUALITY GATE FAILED: test {metric} {verdict['value']} {where} < promote.min_value {floor}"
    )
    if metric not in DECIDED_METRICS:
        return f"{head}; {metric} does not depend on the threshold: {_model_advice(verdict)}"
    if argmax_value is not None and float(argmax_value) >= floor:
        return (
            f"{head}; by argmax it is {argmax_value} >= {floor}: the threshold, not the model, "
            f"fails the gate: {_threshold_advice(op)}"
        )
    return f"{head}; by argmax it is {argmax_value}: {_model_advice(verdict)}"


def _threshold_advice(op: dict[str, Any]) -> str:
    """What moves a threshold that costs the gate: the recall target (and, vouched for,
    its confidence; not vouched for, the precision floor or more positive images)."""
    lower = f"lower report.target_recall (now {op['target_recall']:g})"
    if op["bound_met"]:
        return f"{lower} or report.recall_confidence (now {op['recall_confidence']:g})"
    more = op.get("raw_positives_short")
    add = f", or add about {more} {op['positive_class']} images" if more else ""
    return f"{lower} or raise report.min_precision (now {op.get('min_precision', 0):g}){add}"


def _model_advice(verdict: dict[str, Any]) -> str:
    return (
        "the model falls short: more or cleaner data (see the audit), more training (train.*), "
        f"or promote.min_value below {verdict['min_value']} if {verdict['value']} will do"
    )


def current_champion(meta: dict[str, Any], metric: str, batch_size: int) -> Champion:
    """The served bundle's figure on the candidate's test images (recorded when the data
    is the same, else re-scored on today's test split), or why it is not compared."""
    try:
        bundle = Bundle.read(PATHS.bundle)
    except BundleError as exc:
        return Champion(None, f"no bundle is served yet ({exc})")
    why = not_comparable(meta, bundle)
    if why:
        return Champion(None, why, bundle.md5)
    value = recorded_value(bundle, meta, metric)
    if value is not None:
        return Champion(value, "recorded on the same test images", bundle.md5)
    listed = read_list(PATHS.split_list("test"))
    labels = encode_labels(listed.labels, bundle.class_names)
    log.info("re-scoring the served bundle (md5 %s) on today's test split", bundle.md5)
    figures = score_bundle(bundle, listed.files(PATHS.root), labels, batch_size)
    value = figures.get(metric)
    how = "re-scored on today's test split"
    return Champion(None if value is None else float(value), how, bundle.md5)


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


def register(
    run: Any, ml: Mlflow, verdict: dict[str, Any], git_commit: str | None
) -> dict[str, Any] | None:
    """Register ``models/bundle.zip`` as a new version of ``mlflow.registered_model`` (tagged
    with its md5 and ``git_commit``), move ``mlflow.champion_alias`` to it (the served
    bundle is the champion: promotion compared it with the one it replaces), and tag the
    run. Returns ``{"name", "version", "alias", "champion_value", "champion_version"}``;
    None without a registry (``registered_model: null``) or when MLflow is unreachable."""
    if not ml.registered_model:
        return None
    registered = run.register_bundle(
        PATHS.bundle, ml.registered_model, verdict["metric"], float(verdict["value"]),
        ml.champion_alias, git_commit=git_commit,
    )  # fmt: skip
    if not registered:
        return None
    tags = {k: v for k, v in registered.items() if v is not None}
    run.set_tags({"registered_model": ml.registered_model, **tags})
    log.info(
        "registered %s version %s as @%s (%s %s)",
        ml.registered_model, registered["version"], ml.champion_alias, verdict["metric"],
        verdict["value"],
    )  # fmt: skip
    return {"name": ml.registered_model, **registered}


def judge(
    params: Params, meta: dict[str, Any], test_metrics: dict[str, Any], op: dict[str, Any]
) -> dict[str, Any]:
    """The verdict of ``metrics/promote.json`` (:func:`~imgclf.pipeline.champion.decide`),
    written whatever it says, and the gate's verdict as the bundle records it."""
    cfg = params.promote
    detail = read_json(PATHS.metrics / "report" / "test_detail.json", written_by="report")
    gate = gate_verdict(test_metrics, cfg, detail.get("argmax") or {}, op)
    champion = Champion(None, "the candidate did not pass the gate")
    if gate["passed"]:
        champion = current_champion(meta, cfg.metric, params.report.batch_size)
    verdict = decide(gate, champion, cfg.max_regression)
    write_json(PATHS.promote_metrics, {k: verdict[k] for k in HEADLINE})
    write_json(PATHS.promote_detail, verdict)
    return verdict | {"gate": {k: gate[k] for k in ("metric", "min_value", "value", "passed")}}


def refuse(verdict: dict[str, Any]) -> None:
    """A candidate that is not promoted: a warning line while a bundle stays served (the
    stage succeeds, so an experiment keeps its own figures); a :class:`StageError` when
    none is served yet."""
    what = f"{verdict['reason']}; the candidate is neither promoted nor registered"
    if not PATHS.bundle.is_file():
        raise StageError(f"{what}, and no bundle is promoted yet")
    log.warning("%s, and %s", what, describe_promoted())


def publish(run: Any, ml: Mlflow, link: dict[str, Any], info: dict[str, Any]) -> None:
    """Write ``models/bundle.zip`` and the run facts beside it; register it."""
    md5 = promote_bundle(info)
    facts = {"bundle_md5": md5, "mlflow_run_id": run.run_id if run.ok else None}
    facts |= {"run_name": link["run_name"], "git_commit": link.get("git_commit")}
    write_run_facts(PATHS.bundle, facts)
    registered = register(run, ml, info["gate"], link.get("git_commit"))
    if registered:
        write_run_facts(PATHS.bundle, facts | {"registered": registered})


@stage_main
def main() -> None:
    params = load_params()
    setup_logging(params.base.log_level)
    meta = read_json(PATHS.model_metadata, written_by="train")
    test_metrics = read_json(PATHS.test_metrics, written_by="report")
    op = read_json(PATHS.operating_point, written_by="report")
    from imgclf import tracking

    link = tracking.read_run_link()
    run = tracking.resume(link, params.mlflow.experiment)
    with tracking.taken(run):
        run.log_params(tracking.flatten({"promote": params.promote.model_dump()}))
        verdict = judge(params, meta, test_metrics, op)
        run.set_tags({"quality_gate": "passed" if verdict["gate"]["passed"] else "failed"})
        run.set_tags({"promotion": verdict["verdict"]})
        champion = {"promote_champion": verdict["champion"]} if verdict["champion"] else {}
        run.log_metrics({"promote_promoted": float(verdict["promoted"])} | champion)
        if verdict["promoted"]:
            log.info("%s", verdict["reason"])
            publish(run, params.mlflow, link, bundle_info(meta, op, test_metrics, verdict["gate"]))
        else:
            refuse(verdict)
    tracking.check_required(run, params.mlflow.required)


if __name__ == "__main__":
    sys.exit(main())
