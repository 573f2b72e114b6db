"""HTTP API (FastAPI): classify posted images, health, version, docs and the web page.

Routes:

- ``POST /predict``: one image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``), or ``multipart/form-data`` with one or more file parts.
  Answers ``{"results": [{"name", "probabilities", "top_class", "top_probability",
  "decision"} | {"name", "error"}], "model": {...}}``; 422 when no image could be decoded,
  400 for an empty or malformed body, 413 over ``max_body_bytes``, 415 for other content
  types, 503 when the queue is full or the model is not ready.
- ``GET /healthz`` (process alive), ``GET /readyz`` (model loaded and warmed),
  ``GET /version`` (model hashes, MLflow run id, class names), ``GET /`` (web page),
  ``GET /docs`` and ``GET /openapi.json`` (FastAPI).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from imgclf.serving.batching import NotReady, Overloaded
from imgclf.serving.service import InferenceService

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
RAW_TYPES = ("image/", "application/octet-stream")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: read the whole body with a size cap and a per-read timeout.

    Over ``max_bytes`` (by ``Content-Length`` or while streaming) answers 413; a client that
    stops sending for ``read_timeout`` seconds gets 408. The app then sees the buffered body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await _reject(send, 413, f"body larger than {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                await _reject(send, 408, f"no body data for {self.read_timeout:g} s")
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


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


async def _images_from(request: Request, max_files: int) -> list[tuple[str, bytes]] | JSONResponse:
    """The posted images as ``(name, bytes)``, or the 4xx response explaining why not."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except Exception as exc:  # malformed multipart, too many parts
            return _error(400, f"malformed multipart body: {exc}")
        images: list[tuple[str, bytes]] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append((value.filename or key, await value.read()))
        await form.close()
        if not images:
            return _error(400, "multipart body has no file part")
        return images
    if ctype and not ctype.startswith(RAW_TYPES):
        return _error(415, f"send an image body or multipart/form-data, not {ctype}")
    body = await request.body()
    if not body:
        return _error(400, "empty body: send the image bytes")
    return [(unquote(request.headers.get("x-filename", "body")), body)]


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}


def create_app(
    service: InferenceService, max_body_bytes: int, read_timeout: float, max_files: int
) -> Any:
    """The FastAPI app wrapped in the body-limit middleware."""
    app = FastAPI(
        title="imgclf",
        summary="Image classification: probabilities, top class and thresholded decision.",
        version="0.1.0",
    )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: a bundle loaded and warmed; last reload error")
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        batcher = service.batcher
        return JSONResponse(
            {
                "status": "ready",
                "bundle_md5": service.predictor.version["bundle_md5"],
                "reloads": service.reloads,
                "last_reload_error": service.last_reload_error,
                "batches": batcher.batches,
                "images": batcher.images,
            }
        )

    @app.get("/version", summary="Served bundle: md5, DVC record, gate, metrics, MLflow run")
    async def version() -> JSONResponse:
        if not service.ready:
            return _error(503, "model not loaded yet")
        predictor = service.predictor
        return JSONResponse(
            {
                **predictor.version,
                "loaded_at": predictor.loaded_at,
                "last_reload_error": service.last_reload_error,
            }
        )

    @app.post(
        "/predict",
        summary="Classify one image (raw body) or several (multipart file parts)",
        openapi_extra=PREDICT_BODY,
    )
    async def predict(request: Request) -> JSONResponse:
        images = await _images_from(request, max_files)
        if isinstance(images, JSONResponse):
            return images
        try:
            results, predictor = await service.classify(list(images))
        except (Overloaded, NotReady) as exc:
            return _error(503, str(exc), **{"Retry-After": "1"})
        if all("error" in r for r in results):
            detail = "; ".join(f"{r['name']}: {r['error']}" for r in results)
            return JSONResponse({"detail": detail, "results": results}, status_code=422)
        model = predictor.version
        return JSONResponse(
            {
                "results": results,
                "model": {
                    "bundle_md5": model["bundle_md5"],
                    "mlflow_run_id": model["mlflow_run_id"],
                },
            }
        )

    return BodyLimit(app, max_body_bytes, read_timeout)
