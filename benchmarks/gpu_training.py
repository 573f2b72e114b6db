"""Training throughput of MobileNetV2 at 224 px on whatever device Keras has: float32,
``mixed_float16`` and ``mixed_bfloat16`` (``train.mixed_precision``).

Run on its own, by hand, where a GPU is (RESULTS.md section "Training at scale" quotes
it): the model is the pipeline's (``imgclf.pipeline.model.build_model``, compiled by
``compile_model``), the data synthetic uint8 images, the timing Keras ``fit`` over whole
epochs after one warm-up epoch (tracing and compiling excluded, reported apart)::

    python -m benchmarks.gpu_training --out gpu.json                  # TensorFlow
    KERAS_BACKEND=jax python -m benchmarks.gpu_training --out gpu.json # JAX (XLA)

Not part of ``python -m benchmarks``: CI machines and the 2-core development machine have
no GPU, and a CPU run of MobileNetV2 at 224 px takes minutes per policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("benchmarks.gpu_training")

POLICIES = ("none", "mixed_float16", "mixed_bfloat16")


def device_name() -> str:
    """What Keras computes on: the first accelerator, else the CPU."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        dev = jax.devices()[0]
        return f"jax {jax.__version__}: {dev.platform} {getattr(dev, 'device_kind', '')}".strip()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    kind = tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else ""
    return f"tensorflow {tf.__version__}: {'GPU ' + kind if gpus else 'CPU'}"


def measure(policy: str, batch: int, steps: int, epochs: int, size: int) -> dict[str, Any]:
    """Images/s of ``fit`` under ``policy``: one warm-up epoch, then ``epochs`` timed."""
    import keras

    from imgclf.pipeline.model import build_model, compile_model, precision

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * steps, size, size, 3), dtype=np.uint8).astype("float32")
    y = rng.integers(0, 10, batch * steps).astype("int32")
    keras.utils.set_random_seed(0)
    with precision(policy):
        model = build_model(size, 10, backbone="mobilenetv2", weights="none", dropout=0.2)
    compile_model(model, 1e-3, 0.02)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    result = {
        "policy": policy,
        "images_per_s": round(batch * steps * epochs / seconds, 1),
        "warmup_s": round(warm, 2),
        "timed_s": round(seconds, 2),
        "final_loss": round(float(history.history["loss"][-1]), 4),
    }
    log.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = {
        "device": device_name(),
        "python": platform.python_version(),
        "model": f"MobileNetV2 {args.size} px, 10 classes, weights none",
        "batch": args.batch,
        "steps": args.steps,
        "epochs": args.epochs,
        "runs": [
            measure(p, args.batch, args.steps, args.epochs, args.size)
            for p in args.policies.split(",")
        ],
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
