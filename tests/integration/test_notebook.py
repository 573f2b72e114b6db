"""``notebooks/tester.ipynb`` is stored clean and runs headless (nbclient) on a test bundle,
so it cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from imgclf.testing.bundles import make_bundle

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "tester.ipynb"


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_stored_without_outputs():
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], f"cell {cell.get('id')} holds outputs: clear them"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"
    assert nb.metadata.kernelspec.name == "python3"


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def notebook_inputs(tmp_path, monkeypatch):
    """A bundle, five images (one of them broken) and a report folder, named by the
    notebook's environment variables."""
    bundle = make_bundle(tmp_path / "bundle.zip", threshold=0.52)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    write_png(images / "safe" / "dark.png", np.full((32, 32, 3), 20))
    write_png(images / "safe" / "light.png", np.full((40, 40, 3), 230))
    write_png(images / "sensitive" / "noise.png", rng.integers(0, 256, (32, 32, 3)))
    write_png(images / "sensitive" / "red.png", np.tile([200, 10, 10], (32, 32, 1)))
    (images / "sensitive" / "broken.png").write_bytes(b"not an image")
    report = tmp_path / "report"
    write_png(report / "confusion_matrix.png", np.full((60, 80, 3), 128))
    write_png(report / "roc.png", np.full((60, 80, 3), 64))
    env = {
        "IMGCLF_BUNDLE": str(bundle),
        "IMGCLF_IMAGES": str(images),
        "IMGCLF_REPORT": str(report),
        "IMGCLF_ARCHITECTURE": str(tmp_path / "absent" / "model.png"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        # the kernel's connection file and IPython profile: not in the home folder
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    return bundle, images


def expected_lines(bundle: Path, images: Path) -> list[str]:
    """What the notebook must print per image: the serving Predictor's own decisions."""
    from imgclf.serving.predictor import Predictor

    predictor = Predictor.load(bundle)
    paths = sorted(p for p in images.rglob("*.png"))
    lines = []
    for path, answer in predictor.predict_paths(paths):
        name = path.relative_to(images).as_posix()
        if "error" in answer:
            lines.append(f"{name}: not classified: ")
        else:
            probs = ", ".join(f"{c} {p:.3f}" for c, p in answer["probabilities"].items())
            lines.append(f"{name}: decision {answer['decision']['label']} ({probs})")
    return lines


def test_notebook_runs_headless(notebook_inputs):
    bundle, images = notebook_inputs
    nb = read_notebook()
    n_cells = len(nb.cells)
    # one more cell, in memory only: which Python ran the kernel
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('kernel:', sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name="python3",  # ipykernel's spec: jupyter_client runs it with sys.executable
        timeout=180,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert f"kernel: {sys.executable}\n" in stdout
    assert "class names: safe, sensitive\n" in stdout
    assert "threshold: sensitive when p(sensitive) >= 0.5200\n" in stdout
    assert "gate: test macro_f1 = 0.75 (minimum 0.5): passed\n" in stdout
    for line in expected_lines(bundle, images):
        assert line in stdout, f"{line!r} not in:\n{stdout}"
    assert "confusion_matrix.png\nroc.png\n" in stdout
    assert "no model.png at " in stdout and "skipped" in stdout

    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # the classified images, then the report's two pictures
    # the stored notebook is untouched by the run
    assert len(read_notebook().cells) == n_cells
