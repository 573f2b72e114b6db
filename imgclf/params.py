"""The one typed contract of ``params.yaml`` (the pipeline) and ``serve.yaml`` (the server).

Every stage, the server and the CLIs load their settings through :func:`load_params` or
:func:`load_serve_settings`; nothing else reads those files or restates a default. The
values live in the YAML files only (DVC tracks them there), so every key is required here.

A bad file is one :class:`ParamsError` whose message is one line naming the file and the
dotted key: unknown keys get a did-you-mean, wrong types and out-of-range values say what
was expected and what was found. Loading imports neither TensorFlow nor MLflow, so a bad
``-S key=value`` fails in well under a second, before any run is created.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
GATE_METRICS = ("accuracy", "macro_f1", "roc_auc", "pr_auc")

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Byte = Annotated[int, Field(ge=0, le=255)]
Positive = Annotated[int, Field(gt=0)]

# keys of earlier versions: where their setting lives now
MOVED = {
    "serve": "serving settings live in serve.yaml now",
    "report.min_accuracy": "the quality gate is promote.metric and promote.min_value now",
    "mlflow.run_name": "runs are named after the DVC experiment now",
    "http_max_connections": (
        "no connection cap any more: deadlines close idle and slow connections "
        "(http_idle_timeout, read_timeout, http_body_timeout)"
    ),
}


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming file and key."""


class Section(BaseModel):
    """Every section: unknown keys are errors, values are checked strictly, never coerced
    from strings (``epochs: "3"`` is an error, not 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Base(Section):
    seed: Annotated[int, Field(ge=0)]
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Preprocess(Section):
    size: Annotated[int, Field(ge=8, le=4096)]
    mode: Literal["pad", "crop"]
    background: Annotated[list[Byte], Field(min_length=3, max_length=3)]
    jpeg_quality: Annotated[int, Field(ge=1, le=100)]
    max_pixels: Positive
    formats: Annotated[list[Literal[FORMATS]], Field(min_length=1)]  # type: ignore[valid-type]
    workers: Annotated[int, Field(ge=0)]
    decode_timeout: Annotated[float, Field(gt=0)]


class NearDuplicates(Section):
    max_distance: Annotated[int, Field(ge=0, le=32)] | None
    min_similarity: Annotated[float, Field(ge=-1.0, le=1.0)]


class Split(Section):
    seed: Annotated[int, Field(ge=0)] | None
    test_size: Fraction
    val_size: Fraction
    near_duplicates: NearDuplicates


class Augment(Section):
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"]
    rotation: Annotated[float, Field(ge=0.0, le=1.0)]
    translation: Annotated[float, Field(ge=0.0, lt=1.0)]
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)]
    contrast: Annotated[float, Field(ge=0.0, le=1.0)]


class Train(Section):
    seed: Annotated[int, Field(ge=0)] | None
    backbone: Literal["cnn", "small_cnn", "mobilenetv2", "efficientnetb0", "inceptionv3"]
    weights: str
    backbone_size: Annotated[int, Field(ge=8)] | None
    cnn_filters: Annotated[list[Positive], Field(min_length=1)]
    cnn_depth: Positive
    cnn_dense: Positive
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    batch_size: Positive
    epochs: Positive
    learning_rate: Annotated[float, Field(gt=0.0)]
    lr_schedule: Literal["cosine", "constant"]
    warmup_epochs: Annotated[int, Field(ge=0)]
    weight_decay: Annotated[float, Field(ge=0.0)]
    patience: Positive
    min_delta: Annotated[float, Field(ge=0.0)]
    class_weight: Literal["auto", "none"]
    augment: Augment
    fine_tune_epochs: Annotated[int, Field(ge=0)]
    fine_tune_layers: Positive
    fine_tune_learning_rate: Annotated[float, Field(gt=0.0)]
    distribute: Literal["none", "mirrored", "multi_worker"]
    workers: Positive
    mixed_precision: Literal["none", "mixed_float16", "mixed_bfloat16"]

    @model_validator(mode="after")
    def _weights_fit_backbone(self) -> Train:
        if self.backbone in ("cnn", "small_cnn") and self.weights.lower() == "imagenet":
            raise ValueError(
                f"weights: {self.backbone} has no ImageNet weights (use none or a file)"
            )
        return self

    @model_validator(mode="after")
    def _workers_need_multi_worker(self) -> Train:
        if self.workers > 1 and self.distribute != "multi_worker":
            raise ValueError(
                f"workers: {self.workers} local workers need distribute: multi_worker "
                f"(distribute is {self.distribute})"
            )
        return self


class Report(Section):
    positive_class: str | None
    target_recall: Annotated[float, Field(gt=0.0, le=1.0)]
    # confidence of the one-sided lower bound on val recall that must reach target_recall;
    # below 0.5 the "lower bound" would lie above the measured recall
    recall_confidence: Annotated[float, Field(ge=0.5, lt=1.0)]
    # a threshold the target cannot be vouched for never goes below this val precision
    min_precision: Annotated[float, Field(ge=0.0, le=1.0)]
    batch_size: Positive


class Audit(Section):
    model: Literal["knn", "cnn"]
    folds: Annotated[int, Field(ge=2, le=20)]
    feature_size: Annotated[int, Field(ge=4, le=64)]
    epochs: Positive
    exclude: Literal["none", "label_issues", "suspects"]


class Promote(Section):
    metric: Literal[GATE_METRICS]  # type: ignore[valid-type]
    min_value: Annotated[float, Field(ge=0.0, le=1.0)]
    max_regression: Annotated[float, Field(ge=0.0, le=1.0)]


EXPORT_FORMATS = ("saved_model", "tflite", "onnx")


class Export(Section):
    """``export``: the promoted bundle as SavedModel, TFLite and ONNX, each checked on the
    whole test split against the Keras model."""

    formats: Annotated[list[Literal[EXPORT_FORMATS]], Field(min_length=1)]  # type: ignore[valid-type]
    quantize: Literal["none", "dynamic", "int8"]
    representative_images: Positive
    max_abs_diff: Annotated[float, Field(ge=0.0)]
    min_agreement: Annotated[float, Field(ge=0.0, le=1.0)]
    onnx_opset: Annotated[int, Field(ge=13)]
    batch_size: Positive


class Mlflow(Section):
    experiment: Annotated[str, Field(min_length=1)]
    registered_model: Annotated[str, Field(min_length=1)] | None
    champion_alias: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")]
    required: bool


class Params(Section):
    """``params.yaml``: one attribute per section."""

    base: Base
    preprocess: Preprocess
    split: Split
    audit: Audit
    train: Train
    report: Report
    promote: Promote
    export: Export
    mlflow: Mlflow

    @property
    def split_seed(self) -> int:
        """The seed of the split: ``split.seed``, else ``base.seed``."""
        return self.base.seed if self.split.seed is None else self.split.seed

    @property
    def train_seed(self) -> int:
        """The seed of weights, shuffling and augmentation: ``train.seed``, else ``base.seed``
        (so another initialisation can be tried on the same split)."""
        return self.base.seed if self.train.seed is None else self.train.seed

    def check_classes(self, classes: list[str], where: str) -> None:
        """Cross-check against the class names found in the data (``where`` says where)."""
        name = self.report.positive_class
        if name is not None and classes and name not in classes:
            raise ParamsError(
                f"params.yaml: report.positive_class: {name!r} is not a class; {where} has "
                f"{', '.join(map(repr, classes))} (set one of them, or null for the rarest)"
            )


class ServeSettings(Section):
    """``serve.yaml``: the server's settings (no pipeline stage reads them)."""

    host: str
    http_port: Annotated[int, Field(ge=0, le=65535)]
    tcp_port: Annotated[int, Field(ge=0, le=65535)]
    scan_roots: Annotated[list[str], Field(min_length=1)]
    max_body_bytes: Positive
    max_files: Positive
    max_pixels: Positive
    http_idle_timeout: Annotated[float, Field(gt=0)]
    read_timeout: Annotated[float, Field(gt=0)]
    http_body_timeout: Annotated[float, Field(gt=0)]
    max_batch: Positive
    batch_wait_ms: Annotated[float, Field(ge=0)]
    queue_size: Positive
    decode_workers: Positive
    tcp_max_clients: Positive
    tcp_idle_timeout: Annotated[float, Field(gt=0)]
    tcp_line_timeout: Annotated[float, Field(gt=0)]
    tcp_drain_timeout: Annotated[float, Field(gt=0)]
    reload_poll_seconds: Annotated[float, Field(ge=0)]
    runtime: Literal["auto", "keras", "tflite", "onnx"]


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at ``loc`` (for did-you-mean)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any], model: type[BaseModel], unknown: set[str]) -> str | None:
    """One error as ``dotted.key: what is wrong``; None to drop it (a missing key that an
    unknown key's did-you-mean already names)."""
    loc = tuple(p for p in error["loc"] if not isinstance(p, int) or error["type"] != "missing")
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1)
        moved = difflib.get_close_matches(key, list(MOVED), n=1, cutoff=0.85)
        if key in MOVED:
            return f"{key}: unknown key ({MOVED[key]})"
        if close:
            return f"{key}: unknown key (did you mean '{close[0]}'?)"
        if moved:
            return f"{key}: unknown key ({MOVED[moved[0]]})"
        return f"{key}: unknown key"
    if kind == "missing":
        return None if key in unknown else f"{key}: missing"
    value = error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    message = message[0].lower() + message[1:]
    if kind == "value_error":
        return f"{key}.{message}" if loc else message
    if kind.endswith("_type") or kind.startswith(("int_", "float_", "literal", "bool")):
        return f"{key}: {message}, got {value!r}"
    return f"{key}: {message} (got {value!r})"


def validate(data: Any, model: type[Section], source: str) -> Any:
    """``data`` as ``model``, or :class:`ParamsError` with every problem on one line."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: must hold a mapping of sections, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        suggested = set()
        for e in errors:
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(
                    str(e["loc"][-1]), _known_keys(model, e["loc"]), n=1
                )
                if close:
                    suggested.add(".".join(map(str, (*e["loc"][:-1], close[0]))))
        lines = [_describe(e, model, suggested) for e in errors]
        raise ParamsError(f"{source}: " + "; ".join(x for x in lines if x)) from None


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` is a float as in YAML 1.2 (and as DVC, which
    writes ``-S`` values with ruamel, reads it), not the string YAML 1.1 makes of it."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
        r"|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing or unparsable file is a :class:`ParamsError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path.name}: not found at {path}") from None
    try:
        return yaml.load(text, Loader=_Yaml12Loader) or {}  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(
            f"{path.name}:{where}: not valid YAML ({exc.__class__.__name__})"
        ) from None


def raw_classes(raw: Path) -> list[str]:
    """Class folder names under the raw data folder (none when it does not exist): folders
    that hold an image; an empty one (or one of hidden and sidecar files only) is no class,
    as for ``preprocess`` (:mod:`imgclf.rawdata`)."""
    from imgclf.rawdata import class_folders, holds_image  # the rule preprocess applies

    return [p.name for p in class_folders(raw) if holds_image(p)]


def load_params(path: Path, raw: Path | None = None) -> Params:
    """``params.yaml`` checked against the schema and, when ``raw`` exists, its classes."""
    params = validate(read_yaml(path), Params, path.name)
    if raw is not None:
        params.check_classes(raw_classes(raw), f"{raw.name}/")
    return params


def load_serve_settings(path: Path) -> ServeSettings:
    """``serve.yaml`` checked against the schema."""
    return validate(read_yaml(path), ServeSettings, path.name)


def min_images_per_class(test_size: float, val_size: float) -> int:
    """Images a class needs so each side expects at least one of them."""
    smallest = min(test_size, (1 - test_size) * val_size, (1 - test_size) * (1 - val_size))
    return math.ceil(1 / smallest - 1e-9)
