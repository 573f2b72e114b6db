"""The GPU lock is the CPU lock with TensorFlow's CUDA build in place of tensorflow-cpu."""

from __future__ import annotations

import re
import tomllib

from imgclf.config import PATHS


def pins(name: str) -> dict[str, str]:
    """``{normalised package name: version}`` of a lock file."""
    out = {}
    for line in (PATHS.root / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", package).lower()] = version
    return out


def test_the_gpu_lock_differs_from_the_cpu_lock_only_in_tensorflows_build():
    cpu, gpu = pins("requirements.lock"), pins("requirements-gpu.lock")
    cuda = {name for name in gpu if name.startswith("nvidia-") and name.endswith("-cu12")}
    assert len(cuda) == 12
    assert gpu["tensorflow"] == cpu["tensorflow-cpu"]
    rest = {k: v for k, v in gpu.items() if k not in cuda | {"tensorflow"}}
    assert rest == {k: v for k, v in cpu.items() if k != "tensorflow-cpu"}


def test_the_gpu_extra_names_the_locked_tensorflow():
    project = tomllib.loads((PATHS.root / "pyproject.toml").read_text())["project"]
    (tensorflow,) = project["optional-dependencies"]["gpu"]
    assert tensorflow == f"tensorflow[and-cuda]=={pins('requirements-gpu.lock')['tensorflow']}"
