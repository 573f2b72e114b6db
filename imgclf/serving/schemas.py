"""The HTTP API's bodies, as pydantic models: FastAPI checks every answer against them and
``/openapi.json`` documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Any 4xx/5xx answer: what went wrong, in words."""

    detail: str


class Decision(BaseModel):
    """The decision at the bundle's operating threshold."""

    label: str
    rule: Literal["threshold"]
    positive_class: str
    threshold: float
    positive: bool = Field(description="whether p(positive_class) >= threshold")


class ImageAnswer(BaseModel):
    """One classified image."""

    name: str = Field(description="the multipart file name, X-Filename, or 'body'")
    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    decision: Decision


class ImageError(BaseModel):
    """One image that could not be decoded."""

    name: str
    error: str


class ModelRef(BaseModel):
    """The bundle that answered (during a reload, a request's images share one bundle)."""

    bundle_md5: str
    mlflow_run_id: str | None


class Prediction(BaseModel):
    """``POST /predict``: one result per posted image, in order."""

    results: list[ImageAnswer | ImageError]
    model: ModelRef


class PredictionFailed(BaseModel):
    """``POST /predict`` when no posted image could be decoded (422)."""

    detail: str
    results: list[ImageError]


class Health(BaseModel):
    status: Literal["alive"] = "alive"


class ReloadError(BaseModel):
    """The last reload that failed (the previous bundle is still served)."""

    at: str
    reason: str
    error: str


class Readiness(BaseModel):
    """A bundle is loaded and warmed; reload and batching counters."""

    status: Literal["ready"] = "ready"
    bundle_md5: str
    reloads: int
    last_reload_error: ReloadError | None
    batches: int
    images: int


class Loading(BaseModel):
    status: Literal["loading"] = "loading"


class DvcLockRecord(BaseModel):
    """What ``dvc.lock`` records for the served file, and whether it is these bytes."""

    stage: str
    path: str
    md5: str | None
    matches: bool


class RegistryRecord(BaseModel):
    name: str
    version: str
    alias: str | None


class OperatingPointInfo(BaseModel):
    positive_class: str
    threshold: float


class RuntimeInfo(BaseModel):
    """The engine that runs the model, and why it was chosen."""

    name: Literal["keras", "tflite", "onnx"]
    requested: Literal["auto", "keras", "tflite", "onnx"]
    why: str = Field(description="requested, or the batch-1 timings auto compared")
    timings_ms: dict[str, float] | None = Field(
        None, description="auto: median batch-1 call of each available runtime, timed at load"
    )
    unavailable: dict[str, str] | None = Field(
        None, description="auto: runtimes that could not run this bundle, and why"
    )
    parity: dict[str, Any] | None = Field(
        description="the export stage's parity facts for this runtime's file (null for keras)"
    )


class VersionInfo(BaseModel):
    """The served bundle: its md5 and where it came from, its gate and metrics."""

    source: str = Field(description="project-relative path, file name, or MLflow URI")
    dvc_lock: DvcLockRecord | None
    registry: RegistryRecord | None
    bundle_md5: str
    class_names: list[str]
    image_size: int
    operating_point: OperatingPointInfo
    gate: dict[str, Any]
    metrics: dict[str, float] | None
    data_hash: str | None
    git_commit: str | None
    mlflow_run_id: str | None
    run_name: str | None
    runtime: RuntimeInfo
    loaded_at: float = Field(description="Unix time the bundle was loaded")
    last_reload_error: ReloadError | None
