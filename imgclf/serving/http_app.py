"""HTTP API (FastAPI): classify posted images, health, version, docs and the web page.

Routes (bodies in :mod:`imgclf.serving.schemas`, all in ``/openapi.json``):

- ``POST /predict``: ``multipart/form-data`` with one or more ``files`` parts, or one image
  as the raw body (``Content-Type: image/*`` or ``application/octet-stream``; its name in
  ``X-Filename``). Answers one result per image (probabilities, top class and thresholded
  decision, or the reason it could not be decoded) and the bundle that answered; 422 when
  no image could be decoded, 400 for an empty or malformed body, 413 over
  ``max_body_bytes``, 415 for other content types, 503 when the queue is full or no model
  is loaded.
- ``GET /healthz`` (process alive), ``GET /readyz`` (model loaded and warmed),
  ``GET /version`` (model hashes, MLflow run id, class names), ``GET /`` (web page),
  ``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), both served with their assets
  from the installed ``fastapi-offline`` package, so they work without internet (no CDN),
  and ``GET /openapi.json``.

The app's lifespan owns the :class:`InferenceService` (loads the bundle, starts the
batcher and the watcher; stops them); routes get it through ``Depends``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, File, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgclf.serving.batching import Overloaded
from imgclf.serving.predictor import Predictor
from imgclf.serving.schemas import (
    ErrorBody,
    Health,
    Loading,
    ModelRef,
    Prediction,
    PredictionFailed,
    Readiness,
    VersionInfo,
)
from imgclf.serving.service import InferenceService, NamedImage, NotReady, ServiceConfig

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RAW_TYPES = ("image/", "application/octet-stream")
RETRY = {"Retry-After": "1"}
# Swagger UI 5 (renders OpenAPI 3.1, which FastAPI writes), ReDoc and a favicon, as files
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
DOCS_ASSETS_URL = "/docs-assets"
# no call out of the machine: Swagger UI's default validator badge is an image from
# validator.swagger.io
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP request may send: its body's size, the longest pause between two of
    its chunks and the time for all of it (seconds)."""

    max_body_bytes: int
    read_timeout: float
    max_files: int
    body_timeout: float


class BodyLimit:
    """ASGI middleware: read the whole body with a size cap and two deadlines.

    Over ``max_bytes`` (by ``Content-Length`` or while streaming) answers 413; a client that
    stops sending for ``read_timeout`` seconds, or has not sent all of it ``body_timeout``
    seconds after the headers (however it trickles), gets 408 and the connection is
    closed. The app then sees the buffered body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float, body_timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await _reject(send, 413, f"body larger than {self.max_bytes} bytes")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), min(self.read_timeout, left))
            except TimeoutError:
                if left <= self.read_timeout:
                    detail = f"body not complete within {self.body_timeout:g} s"
                else:
                    detail = f"no body data for {self.read_timeout:g} s"
                await _reject(send, 408, detail)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reject(send, 413, f"body larger than {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ dependencies
def app_service(app: FastAPI) -> InferenceService:
    """The inference service the app's lifespan started."""
    service: InferenceService = app.state.service
    return service


def get_service(request: Request) -> InferenceService:
    """Dependency: the app's inference service."""
    return app_service(request.app)


Service = Annotated[InferenceService, Depends(get_service)]


def ready_predictor(service: Service) -> Predictor:
    """Dependency: the served predictor, or 503 while none is loaded."""
    try:
        return service.predictor
    except NotReady as exc:
        raise HTTPException(503, str(exc), headers=RETRY) from None


async def posted_images(
    request: Request,
    files: Annotated[
        list[UploadFile] | None, File(description="one or more images (multipart/form-data)")
    ] = None,
    content_type: Annotated[str, Header()] = "",
    x_filename: Annotated[
        str | None, Header(description="the raw body's file name, URL-encoded")
    ] = None,
) -> list[NamedImage]:
    """Dependency: the posted images as ``(name, bytes)``, or the 4xx saying why not."""
    ctype = content_type.lower()
    if ctype.startswith("multipart/form-data"):
        if not files:
            raise HTTPException(400, "multipart body has no `files` part")
        return [(upload.filename or "files", await upload.read()) for upload in files]
    if ctype and not ctype.startswith(RAW_TYPES):
        raise HTTPException(415, f"send an image body or multipart/form-data, not {ctype}")
    body = await request.body()  # FastAPI has no parameter type for a raw binary body
    if not body:
        raise HTTPException(400, "empty body: send the image bytes")
    return [(unquote(x_filename or "body"), body)]


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    """A request FastAPI could not parse (e.g. a text field named ``files``): 400, one
    line."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    said = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": said or "bad request"}, status_code=400)


# ------------------------------------------------------------------ routes
router = APIRouter()

NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "no model loaded yet"}
}
PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "empty or malformed body, too many files"},
    408: {"model": ErrorBody, "description": "the body stopped arriving, or came too slowly"},
    413: {"model": ErrorBody, "description": "body larger than max_body_bytes"},
    415: {"model": ErrorBody, "description": "neither an image nor multipart/form-data"},
    422: {"model": PredictionFailed, "description": "no posted image could be decoded"},
    503: {"model": ErrorBody, "description": "queue full or no model loaded: retry"},
}
# the raw-body alternative to the multipart form FastAPI documents from ``files``
RAW_IMAGE_BODY = {
    "requestBody": {
        "content": {
            media: {"schema": {"type": "string", "contentMediaType": media}}
            for media in ("image/*", "application/octet-stream")
        }
    }
}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI on ``/openapi.json``, its assets served by this app (works offline)."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
    )


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc on ``/openapi.json``, its script served by this app (no web fonts)."""
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    summary="Readiness: a bundle loaded and warmed; last reload error",
    response_model=Readiness,
    responses={503: {"model": Loading, "description": "no model loaded yet"}},
)
async def readyz(service: Service) -> Readiness | JSONResponse:
    if not service.ready:
        return JSONResponse(Loading().model_dump(), status_code=503, headers=RETRY)
    return Readiness(
        bundle_md5=service.predictor.version["bundle_md5"],
        reloads=service.reloads,
        last_reload_error=service.last_reload_error,
        batches=service.batcher.batches,
        images=service.batcher.images,
    )


@router.get(
    "/version",
    summary="Served bundle: md5, DVC record, gate, metrics, MLflow run",
    responses=NOT_READY,
)
async def version(
    service: Service, predictor: Annotated[Predictor, Depends(ready_predictor)]
) -> VersionInfo:
    return VersionInfo(
        **predictor.version,
        loaded_at=predictor.loaded_at,
        last_reload_error=service.last_reload_error,
    )


@router.post(
    "/predict",
    summary="Classify one image (raw body) or several (multipart `files` parts)",
    response_model=Prediction,
    responses=PREDICT_ERRORS,
    openapi_extra=RAW_IMAGE_BODY,
)
async def predict(
    images: Annotated[list[NamedImage], Depends(posted_images)], service: Service
) -> Prediction | JSONResponse:
    try:
        results, predictor = await service.classify(images)
    except (Overloaded, NotReady) as exc:
        raise HTTPException(503, str(exc), headers=RETRY) from None
    if all("error" in result for result in results):
        detail = "; ".join(f"{result['name']}: {result['error']}" for result in results)
        failed = PredictionFailed(detail=detail, results=results)
        return JSONResponse(failed.model_dump(), status_code=422)
    model = predictor.version
    return Prediction(
        results=results,
        model=ModelRef(bundle_md5=model["bundle_md5"], mlflow_run_id=model["mlflow_run_id"]),
    )


def create_app(config: ServiceConfig, limits: HttpLimits) -> FastAPI:
    """The HTTP app; its lifespan runs an :class:`InferenceService` for ``config``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with InferenceService(config) as service:
            app.state.service = service
            yield

    app = FastAPI(
        title="imgclf",
        summary="Image classification: probabilities, top class and thresholded decision.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc are routes above, on local assets, not a CDN
        redoc_url=None,
        form_limits={"max_files": limits.max_files, "max_fields": limits.max_files},
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=limits.max_body_bytes,
        read_timeout=limits.read_timeout,
        body_timeout=limits.body_timeout,
    )
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.include_router(router)
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    return app
