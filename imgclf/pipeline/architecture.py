"""A picture of the model's architecture: ``models/candidate/model.png``, drawn by ``train``.

The picture is Keras' own diagram (:func:`keras.utils.model_to_dot`, what
``keras.utils.plot_model`` draws: one box per layer with its input and output shapes, the
backbone expanded as a dashed cluster), rendered to PNG by Graphviz's ``dot``. That needs
the ``pydot`` package (a pinned dependency) and the ``dot`` program, which on Debian and
Ubuntu is the package ``graphviz`` (``apt-get install graphviz``). Without ``dot``,
:func:`draw_model` fails with one line saying so; it never skips silently.

The picture is byte-for-byte reproducible on one machine: Keras names the graph's nodes by
the layers' memory addresses, which differ from run to run, so they are renamed ``n0``,
``n1``... in drawing order before ``dot`` sees the graph, and Graphviz's PNG holds no
timestamp. (Another Graphviz version or other fonts can draw other bytes.)
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from imgclf.config import StageError
from imgclf.files import write_bytes

log = logging.getLogger(__name__)

DOT = "dot"
DEBIAN_PACKAGE = "graphviz"
DPI = 72  # about one pixel per point: readable, and ~1-2 MB for a 150-layer backbone
TIMEOUT = 300  # seconds for dot: a large backbone takes about a second
_NODE = re.compile(r"^\s*(\d+)\s*\[", re.MULTILINE)
_TOKEN = re.compile(r"(?<![\w.])\d+(?![\w.])")


class GraphvizMissingError(StageError):
    """Drawing is impossible here (no ``dot`` on ``PATH``, or no ``pydot``)."""


def missing() -> str | None:
    """Why the architecture cannot be drawn here (one line), or None when it can."""
    try:
        import pydot  # noqa: F401
    except ImportError:
        return "drawing the model needs the Python package pydot: pip install -r requirements.lock"
    if shutil.which(DOT) is None:
        return (
            f"drawing the model needs Graphviz's `{DOT}` program, not found on PATH: install "
            f"the Debian/Ubuntu package `{DEBIAN_PACKAGE}` (apt-get install {DEBIAN_PACKAGE}; "
            f"macOS: brew install graphviz)"
        )
    return None


def can_draw() -> bool:
    """True when :func:`draw_model` can work here (``pydot`` importable, ``dot`` on PATH)."""
    return missing() is None


def dot_source(model: Any, dpi: int = DPI) -> str:
    """The model's Graphviz source, with stable node names (no memory addresses)."""
    import keras

    graph = keras.utils.model_to_dot(
        model,
        show_shapes=True,
        show_layer_names=True,
        show_layer_activations=True,
        expand_nested=True,
        dpi=dpi,
    )
    # the cluster of a nested model is labelled in Graphviz's default serif font
    for cluster in _clusters(graph):
        cluster.set("fontname", "Helvetica")
    text = graph.to_string()
    names = {old: f"n{i}" for i, old in enumerate(dict.fromkeys(_NODE.findall(text)))}
    # node ids are all digits; a number inside a label (a shape) is left alone unless it
    # happens to equal a memory address, which a shape cannot
    return _TOKEN.sub(lambda m: names.get(m.group(0), m.group(0)), text)


def _clusters(graph: Any) -> list[Any]:
    found = []
    for sub in graph.get_subgraph_list():
        found += [sub, *_clusters(sub)]
    return found


def draw_model(model: Any, path: Path, dpi: int = DPI) -> Path:
    """Write a PNG diagram of a built Keras ``model`` to ``path`` (atomically); returns it.

    Raises :class:`GraphvizMissingError` (a :class:`~imgclf.config.StageError`: one
    ``error:`` line from a stage) when ``dot`` or ``pydot`` is missing, and
    :class:`StageError` when ``dot`` fails.
    """
    reason = missing()
    if reason:
        raise GraphvizMissingError(reason)
    source = dot_source(model, dpi)
    try:
        proc = subprocess.run(
            [shutil.which(DOT) or DOT, "-Tpng"],
            input=source.encode(),
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageError(f"drawing the model with `{DOT}` failed: {exc}") from exc
    if proc.returncode != 0 or not proc.stdout.startswith(b"\x89PNG"):
        said = proc.stderr.decode(errors="replace").strip().splitlines()
        raise StageError(
            f"drawing the model with `{DOT}` failed (exit status {proc.returncode})"
            + (f": {said[-1]}" if said else "")
        )
    return write_bytes(path, proc.stdout)


def draw_if_possible(model: Any, path: Path) -> Path | None:
    """:func:`draw_model` where Graphviz is installed; elsewhere a warning saying what is
    missing, and None (a picture is no reason to throw a training away)."""
    reason = missing()
    if reason:
        log.warning("%s not drawn: %s", path, reason)
        return None
    return draw_model(model, path)
