"""Find the best experiment of a sweep, and apply it: ``python -m imgclf.experiments``.

Every experiment records its own test figures (``metrics/test.json``) and its verdict
(``metrics/promote.json``: promoted, or why not: ``below_min_value``, ``regression``), so
``dvc exp show --json`` holds all that is needed. The best is the experiment of highest
``promote.metric`` among those that were promoted in their own run (each beat, or equalled,
the bundle served at its baseline); ``--apply`` runs ``dvc exp apply`` on it, which brings
its params, metrics and ``models/bundle.zip`` into the workspace (a running server swaps to
it). Experiments that failed, are queued or running are listed without figures.

Usage::

    python -m imgclf.experiments            # the table of experiments and the best one
    python -m imgclf.experiments --apply    # ... and dvc exp apply it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from imgclf.config import PATHS, StageError, load_params, stage_main

PROMOTED = "promoted"


@dataclass(frozen=True)
class Experiment:
    """One row of ``dvc exp show --json``: an experiment (or a baseline commit)."""

    name: str
    rev: str
    test: dict[str, Any]  # metrics/test.json, {} when it has none (failed, queued)
    verdict: str | None  # metrics/promote.json "verdict"
    changed: dict[str, Any] = field(default_factory=dict)  # params that differ from baseline
    error: str | None = None

    def value(self, metric: str) -> float | None:
        got = self.test.get(metric)
        return None if got is None else float(got)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _row(entry: dict[str, Any], base_params: dict[str, Any]) -> Experiment:
    data = entry.get("data") or {}
    metrics = data.get("metrics") or {}
    test = (metrics.get("metrics/test.json") or {}).get("data") or {}
    verdict = ((metrics.get("metrics/promote.json") or {}).get("data") or {}).get("verdict")
    params = _flat(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    changed = {k: v for k, v in params.items() if base_params.get(k) != v}
    error = entry.get("error")
    name = entry.get("name") or str(entry.get("rev", ""))[:7]
    msg = (
        None
        if error is None
        else str(error.get("msg", error) if isinstance(error, dict) else error)
    )
    return Experiment(name, str(entry.get("rev")), test, verdict, changed, msg)


def parse_show(show: list[dict[str, Any]]) -> Iterator[tuple[Experiment, list[Experiment]]]:
    """Each baseline commit of ``dvc exp show --json`` with its experiments (the workspace
    row is left out)."""
    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        base = _row(commit, {})
        base_params = _flat(
            ((commit["data"].get("params") or {}).get("params.yaml") or {}).get("data") or {}
        )
        exps = [
            _row(rev, base_params)
            for group in commit.get("experiments") or []
            for rev in group.get("revs") or []
        ]
        yield Experiment(base.name, base.rev, base.test, base.verdict), exps


def best(exps: list[Experiment], metric: str) -> Experiment | None:
    """The promoted experiment of highest ``metric`` (ties: the first listed, the newest);
    None when none was promoted."""
    promoted = [e for e in exps if e.verdict == PROMOTED and e.value(metric) is not None]
    return max(promoted, key=lambda e: e.value(metric) or 0.0, default=None)


def table(base: Experiment, exps: list[Experiment], metric: str) -> str:
    """The baseline and its experiments, one line each: name, metric, verdict, changes."""
    lines = [f"{'experiment':<24} {metric:>10}  {'verdict':<16} params changed"]
    for exp in [base, *exps]:
        value = exp.value(metric)
        shown = "-" if value is None else f"{value:.4f}"
        verdict = exp.verdict or ("failed" if exp.error else "-")
        changes = " ".join(f"{k}={v}" for k, v in sorted(exp.changed.items()))
        lines.append(f"{exp.name:<24} {shown:>10}  {verdict:<16} {changes}".rstrip())
    return "\n".join(lines)


def dvc(*args: str) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in the project root with this interpreter's DVC."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=PATHS.root, capture_output=True, text=True
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m imgclf.experiments", description=__doc__)
    ap.add_argument("--apply", action="store_true", help="dvc exp apply the best experiment")
    ap.add_argument("--metric", help="rank by this test metric (default: promote.metric)")
    return ap.parse_args(argv)


@stage_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metric = args.metric or load_params().promote.metric
    shown = dvc("exp", "show", "--json")
    if shown.returncode != 0:
        raise StageError(f"dvc exp show failed: {shown.stderr.strip().splitlines()[-1:]}")
    groups = list(parse_show(json.loads(shown.stdout)))
    exps = [e for _, group in groups for e in group]
    for base, group in groups:
        if group:
            print(table(base, group, metric))
    chosen = best(exps, metric)
    if chosen is None:
        print(f"no experiment was promoted (none beat its baseline's bundle on {metric})")
        return 1
    print(f"best: {chosen.name} ({metric} {chosen.value(metric):.4f})")
    if args.apply:
        applied = dvc("exp", "apply", chosen.name)
        if applied.returncode != 0:
            raise StageError(f"dvc exp apply {chosen.name} failed: {applied.stderr.strip()}")
        print(
            f"applied {chosen.name}: its params, metrics and models/bundle.zip are in the workspace"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
