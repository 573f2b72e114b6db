"""Writers of the export formats: the inference-only model as SavedModel, TFLite, ONNX.

Each writer is deterministic: the same model gives the same bytes in another process, so
``dvc repro -f`` leaves ``dvc.lock`` unchanged. Two library outputs needed help for that:

- ``tf.saved_model.save`` writes a random ``uuid`` into ``fingerprint.pb``: it is cleared
  (the other fingerprint fields are hashes of the content and stay);
- tf2onnx numbers the constants it folds in an order that varies between processes: the
  graph's tensors are renamed by first use (:func:`canonical_onnx`). ONNX is converted from
  the TFLite file (``tf2onnx.convert.from_tflite``), whose bytes are already deterministic.

Keras' own ``model.export(format="onnx")`` and ``format="tf_saved_model"`` work too, but
their bytes differ from run to run (variable order, folded-constant names).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Layers that only act in training: augmentation (random transforms, compiled to ops such
# as ImageProjectiveTransformV3 that TFLite lacks) and dropout.
TRAINING_ONLY = (
    "RandomFlip",
    "RandomRotation",
    "RandomTranslation",
    "RandomZoom",
    "RandomContrast",
    "RandomBrightness",
    "Dropout",
)
QUANTIZED = ("dynamic", "int8")


def inference_model(model: Any) -> Any:
    """``model`` without its training-only layers, sharing its weights. The classifier is a
    chain of layers (input, augmentation, resize, rescale, backbone, dropout, head); another
    shape is refused with ``ValueError`` rather than guessed at."""
    import keras

    previous = model.inputs[0]._keras_history.operation  # the InputLayer
    chain = [layer for layer in model.layers if layer is not previous]
    for layer in chain:
        nodes = layer._inbound_nodes  # the first is this model's (later ones: other models')
        parents = [t._keras_history.operation for t in nodes[0].input_tensors] if nodes else []
        if parents != [previous]:
            raise ValueError(f"layer {layer.name} is not fed by {previous.name} alone")
        previous = layer
    inputs = keras.Input(model.input_shape[1:], name=model.inputs[0].name)
    x = inputs
    for layer in chain:
        if type(layer).__name__ not in TRAINING_ONLY:
            x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_inference")


def training_only_layers(model: Any) -> list[str]:
    """Names of the layers :func:`inference_model` leaves out."""
    return [layer.name for layer in model.layers if type(layer).__name__ in TRAINING_ONLY]


def write_saved_model(model: Any, folder: Path) -> Path:
    """A SavedModel with one ``serving_default`` signature: ``image`` (float32 pixels 0-255,
    any batch) to ``probs``."""
    import tensorflow as tf
    from tensorflow.core.protobuf import fingerprint_pb2

    size = tuple(model.input_shape[1:])

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32, name="image")])
        def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"probs": self.model(image, training=False)}

    module = Serving()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    path = folder / "fingerprint.pb"
    if path.is_file():
        fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
        fingerprint.ClearField("uuid")  # random per save; the hashes beside it are not
        path.write_bytes(fingerprint.SerializeToString(deterministic=True))
    return folder


def representative_data(images: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """TFLite's calibration input: one image at a time."""

    def batches() -> Iterator[list[np.ndarray]]:
        for image in images:
            yield [image[None].astype(np.float32)]

    return batches


def write_tflite(
    model: Any, path: Path, quantize: str = "none", representative: np.ndarray | None = None
) -> Path:
    """A ``.tflite`` model: float32, or ``dynamic`` (int8 weights, float activations), or
    ``int8`` (weights and activations, calibrated on ``representative``; float32 input and
    output, so every runtime is fed the same way)."""
    import tensorflow as tf

    options: dict[str, Any] = {}
    if quantize in QUANTIZED:
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 quantisation needs representative images")
        options["representative_dataset"] = representative_data(representative)
    elif quantize not in ("none", "dynamic"):
        raise ValueError(f"unknown quantisation {quantize!r}: none, dynamic or int8")
    model.export(str(path), format="litert", verbose=False, **options)
    return path


def write_onnx(tflite: Path, path: Path, opset: int) -> Path:
    """An ONNX model converted from the float ``.tflite`` file, names made canonical."""
    import onnx
    import tf2onnx

    with warnings.catch_warnings():  # tf2onnx reads the file with TF's deprecated interpreter
        warnings.simplefilter("ignore", UserWarning)
        model, _ = tf2onnx.convert.from_tflite(str(tflite), opset=opset)
    model = canonical_onnx(model)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def canonical_onnx(model: Any) -> Any:
    """``model`` with generated names replaced: the input is ``image``, the output ``probs``,
    their batch dimension ``batch``; every other tensor is renamed by its first use in node
    order (``t<k>``, initializers ``c<k>``, sorted), nodes ``<op>_<k>``. Two conversions of
    one model that differ only in generated names become the same bytes."""
    graph = model.graph
    names = {graph.input[0].name: "image", graph.output[0].name: "probs"}
    constants = {i.name for i in graph.initializer}

    def rename(name: str) -> str:
        if name and name not in names:
            names[name] = f"{'c' if name in constants else 't'}{len(names)}"
        return names.get(name, name)

    for k, node in enumerate(graph.node):
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = f"{node.op_type}_{k}"
    for info in (*graph.input, *graph.output, *graph.value_info):
        info.name = rename(info.name)
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = "batch"
    for initializer in graph.initializer:
        initializer.name = rename(initializer.name)
    _sort(graph.initializer, key=lambda i: int(i.name[1:]))
    _sort(graph.value_info, key=lambda v: v.name)
    return model


def _sort(field: Any, key: Callable[[Any], Any]) -> None:
    """Sort a repeated protobuf field in place."""
    items = [type(x)() for x in field]
    for target, source in zip(items, sorted(field, key=key), strict=True):
        target.CopyFrom(source)
    del field[:]
    field.extend(items)


def saved_model_call(folder: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel's ``serving_default`` signature as ``pixels -> probabilities``."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    return lambda batch: serve(image=tf.constant(batch))["probs"].numpy()
