"""The HTTP API in process: the FastAPI app with its lifespan (``TestClient``), a tiny real
bundle, and the answers compared with the served predictor's own."""

from __future__ import annotations

import asyncio
import json
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from imgclf.files import file_md5
from imgclf.serving.http_app import (
    BodyLimit,
    HttpLimits,
    app_service,
    create_app,
    get_service,
)
from imgclf.serving.predictor import Predictor
from imgclf.serving.service import FILE_CHANGED, InferenceService, ServiceConfig
from imgclf.testing import images as f
from imgclf.testing.bundles import (
    RUN_FACTS,
    bundle_info,
    make_bundle,
    replace_atomically,
    string_values,
)
from imgclf.testing.server import poll

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx is what is installed
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

MAX_BODY = 200_000
MAX_FILES = 12
QUEUE = 8
RUN_ID = "5f" * 16  # the MLflow run the bundle's facts name
LIMITS = HttpLimits(
    max_body_bytes=MAX_BODY, read_timeout=1.0, max_files=MAX_FILES, body_timeout=5.0
)
VERSION_KEYS = {
    "source", "dvc_lock", "registry", "bundle_md5", "class_names", "image_size",
    "operating_point", "gate", "metrics", "data_hash", "git_commit", "mlflow_run_id",
    "run_name", "runtime", "loaded_at", "last_reload_error",
}  # fmt: skip


def _config(source, reload_poll_seconds: float = 0.0) -> ServiceConfig:
    return ServiceConfig(
        source=str(source),
        queue_size=QUEUE,
        batch_wait_ms=20.0,
        reload_poll_seconds=reload_poll_seconds,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("http") / "models", mlflow_run_id=RUN_ID)


@pytest.fixture(scope="module")
def started():
    return time.time()


@pytest.fixture(scope="module")
def app(bundle, started):
    return create_app(_config(bundle), LIMITS)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def predictor(app, client) -> Predictor:
    """The predictor the app serves (its lifespan loaded it)."""
    return app_service(app).predictor


def expected(predictor: Predictor, data: bytes) -> dict:
    """The served predictor's own answer for one image."""
    pixels = predictor.decode_image(data)[None]
    return predictor.describe(predictor.predict_arrays(pixels)[0])


def _post_raw(client, data: bytes, ctype: str = "image/jpeg", **headers):
    return client.post("/predict", content=data, headers={"Content-Type": ctype, **headers})


def _assert_same_answer(got: dict, want: dict) -> None:
    """Equal answers (up to float noise of another batch size), names aside."""
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    assert got["top_probability"] == pytest.approx(want["top_probability"], abs=1e-6)
    assert (got["top_class"], got["decision"]) == (want["top_class"], want["decision"])


# ---------------------------------------------------------------- /predict
def test_raw_body_is_the_predictors_answer(client, predictor, bundle):
    data = f.jpeg(1)
    r = _post_raw(client, data)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "results": [{"name": "body", **expected(predictor, data)}],
        "model": {"bundle_md5": file_md5(bundle), "mlflow_run_id": RUN_ID},
    }


def test_raw_body_named_by_x_filename(client):
    r = _post_raw(client, f.png(2), "image/png", **{"X-Filename": "cat%20photo.png"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["name"] == "cat photo.png"


def test_multipart_several_images_one_bad(client, predictor):
    images = {"a.jpg": f.jpeg(2), "b.png": f.png(3), "c.gif": f.animated_gif()}
    files = [("files", (name, data, "image/*")) for name, data in images.items()]
    files.append(("files", ("bad.jpg", b"not an image", "image/jpeg")))
    r = client.post("/predict", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [a["name"] for a in results] == [*images, "bad.jpg"]
    for answer, data in zip(results, images.values(), strict=False):
        _assert_same_answer(answer, expected(predictor, data))
    assert set(results[3]) == {"name", "error"}
    assert "not an image" in results[3]["error"]


def test_same_image_same_answer_raw_and_multipart(client):
    data = f.png(4)
    raw = _post_raw(client, data, "image/png").json()["results"][0]
    multi = client.post("/predict", files={"files": ("x.png", data, "image/png")})
    _assert_same_answer(multi.json()["results"][0], raw)


@pytest.mark.parametrize(
    ("body", "ctype", "status", "words"),
    [
        (b"\x00garbage bytes\xff" * 10, "application/octet-stream", 422, "not an image"),
        (f.truncated_jpeg(), "image/jpeg", 422, "truncated"),
        (f.bomb_png(), "image/png", 422, "too many pixels"),
        (f.CRASHING_GIF, "image/gif", 422, "corrupt image"),
        (b"", "image/jpeg", 400, "empty body: send the image bytes"),
        (b"x" * (MAX_BODY + 1), "image/jpeg", 413, f"body larger than {MAX_BODY} bytes"),
        (b'{"a": 1}', "application/json", 415, "not application/json"),
        (b"--nope\r\n\r\n", "multipart/form-data; boundary=zzz", 400, "Invalid multipart data"),
    ],
    ids=["garbage", "truncated", "bomb", "decoder-bug", "empty", "oversized", "json", "multipart"],
)
def test_bad_input_is_4xx_with_message(client, body, ctype, status, words):
    r = _post_raw(client, body, ctype)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert client.get("/readyz").status_code == 200  # the service survived


def test_undecodable_image_lists_the_reason_per_image(client):
    r = _post_raw(client, f.truncated_jpeg(), **{"X-Filename": "t.jpg"})
    assert r.status_code == 422
    body = r.json()
    (result,) = body["results"]
    assert result["name"] == "t.jpg" and "truncated" in result["error"]
    assert body["detail"] == f"t.jpg: {result['error']}"


def test_oversized_streamed_body_without_length_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"y" * 50_000

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413
    assert r.json() == {"detail": f"body larger than {MAX_BODY} bytes"}


def _through_body_limit(
    chunks: list[tuple[float, bytes]], read_timeout: float, body_timeout: float
) -> tuple[list[dict], bytes | None]:
    """Run :class:`BodyLimit` on a POST whose body arrives as ``(delay, bytes)`` chunks (the
    way a slow socket delivers it): what it sent back, and the body the app got (None when
    the app was not called)."""
    got: list[bytes] = []
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        got.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        delay, chunk = chunks.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": []}
    limit = BodyLimit(app, max_bytes=1000, read_timeout=read_timeout, body_timeout=body_timeout)
    asyncio.run(limit(scope, receive, send))
    return sent, (got[0] if got else None)


@pytest.mark.parametrize(
    ("delays", "status", "detail"),
    [
        ([0.05] * 4, 200, None),  # in time
        ([0.05, 0.35], 408, "no body data for 0.2 s"),  # one pause too long
        ([0.1] * 10, 408, "body not complete within 0.5 s"),  # each in time, all too slow
    ],
    ids=["in-time", "pause", "trickle"],
)
def test_body_deadlines_between_chunks_and_for_the_whole_body(delays, status, detail):
    started = time.monotonic()
    sent, body = _through_body_limit(
        [(d, b"x") for d in delays], read_timeout=0.2, body_timeout=0.5
    )
    took = time.monotonic() - started
    assert sent[0]["status"] == status
    if status == 200:
        assert body == b"x" * len(delays)
        return
    assert body is None  # the app never ran
    assert (b"connection", b"close") in sent[0]["headers"]  # the server closes it
    assert json.loads(sent[1]["body"]) == {"detail": detail}
    assert took < 0.5 + 0.3  # at the deadline, not when the last chunk would have come


@pytest.mark.parametrize(
    ("files", "data", "detail"),
    [
        ({"file": ("a.jpg", f.jpeg(1), "image/jpeg")}, None, "multipart body has no `files` part"),
        (None, {"files": "text"}, "body.files.0: Value error, Expected UploadFile"),
        (
            [("files", (f"{i}.png", b"x", "image/png")) for i in range(MAX_FILES + 1)],
            None,
            f"Too many files. Maximum number of files is {MAX_FILES}.",
        ),
    ],
    ids=["other-field", "text-field", "too-many-files"],
)
def test_bad_multipart_is_400(client, files, data, detail):
    r = client.post("/predict", files=files, data=data)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(detail), r.text


def test_full_queue_is_503_overloaded(client):
    files = [("files", (f"{i}.png", f.png(i), "image/png")) for i in range(QUEUE + 1)]
    r = client.post("/predict", files=files)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "server busy (0 images in progress)"}


def test_concurrent_requests_are_micro_batched(client):
    before = client.get("/readyz").json()
    with ThreadPoolExecutor(QUEUE) as pool:
        responses = list(pool.map(lambda i: _post_raw(client, f.jpeg(i)), range(QUEUE)))
    assert [r.status_code for r in responses] == [200] * QUEUE
    after = client.get("/readyz").json()
    assert after["images"] - before["images"] == QUEUE
    assert after["batches"] - before["batches"] < QUEUE  # some calls held several images


# ------------------------------------------------------------- not ready yet
@pytest.fixture
def unloaded(app, bundle):
    """The app with a service that never loaded a model (as between start and load)."""
    service = InferenceService(_config(bundle))
    app.dependency_overrides[get_service] = lambda: service
    yield
    app.dependency_overrides.clear()


def test_no_model_is_503_not_ready(client, unloaded):
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (503, {"status": "loading"})
    for r in (client.get("/version"), _post_raw(client, f.jpeg(1))):
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"detail": "model not loaded yet"}


# ------------------------------------------------------ health, version, docs
def test_health_and_readiness(client, bundle):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert set(ready) == {
        "status", "bundle_md5", "reloads", "last_reload_error", "batches", "images",
    }  # fmt: skip
    assert ready["status"] == "ready"
    assert ready["bundle_md5"] == file_md5(bundle)
    assert (ready["reloads"], ready["last_reload_error"]) == (0, None)


def test_version_describes_the_served_bundle(client, predictor, bundle, started):
    v = client.get("/version").json()
    assert set(v) == VERSION_KEYS
    info = bundle_info()
    assert v["source"] == "bundle.zip"  # outside the project: the name, never the full path
    assert (v["dvc_lock"], v["registry"]) == (None, None)
    assert v["bundle_md5"] == file_md5(bundle)
    assert v["class_names"] == ["safe", "sensitive"] and v["image_size"] == 32
    assert v["operating_point"] == {"positive_class": "sensitive", "threshold": 0.4}
    for key in ("gate", "metrics", "data_hash"):
        assert v[key] == info[key], key
    # run facts come from bundle.run.json beside the bundle, not from its bytes
    assert (v["mlflow_run_id"], v["run_name"]) == (RUN_ID, RUN_FACTS["run_name"])
    assert v["git_commit"] == RUN_FACTS["git_commit"]
    assert v["last_reload_error"] is None
    no_export = "no export (run the export stage: export/bundle.json: No such file or directory)"
    assert v["runtime"] == {
        "name": "keras", "requested": "auto", "why": f"the only runtime (tflite: {no_export}; "
        f"onnx: {no_export})", "timings_ms": None, "unavailable": dict.fromkeys(
            ("tflite", "onnx"), no_export), "parity": None,
    }  # fmt: skip
    assert v["loaded_at"] == predictor.loaded_at and started <= v["loaded_at"] <= time.time()
    assert str(bundle.parent) not in json.dumps(v)
    assert [s for s in string_values(v) if s.startswith("/")] == []


def test_openapi_documents_bodies_and_errors(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    content = predict["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "image/*", "application/octet-stream"}
    form = content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    files = spec["components"]["schemas"][form]["properties"]["files"]["anyOf"][0]
    assert (files["type"], files["items"]["type"]) == ("array", "string")  # file parts
    assert content["image/*"]["schema"] == {"type": "string", "contentMediaType": "image/*"}
    assert set(predict["responses"]) == {"200", "400", "408", "413", "415", "422", "503"}

    def schema_of(path: str, method: str, status: str) -> str:
        body = spec["paths"][path][method]["responses"][status]["content"]["application/json"]
        return body["schema"]["$ref"].rsplit("/", 1)[1]

    assert schema_of("/predict", "post", "200") == "Prediction"
    assert schema_of("/predict", "post", "422") == "PredictionFailed"
    assert schema_of("/predict", "post", "503") == "ErrorBody"
    assert schema_of("/version", "get", "200") == "VersionInfo"
    assert schema_of("/readyz", "get", "200") == "Readiness"
    assert schema_of("/readyz", "get", "503") == "Loading"
    assert schema_of("/healthz", "get", "200") == "Health"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_work_offline(client, page):
    """Swagger UI and ReDoc load every asset from this app: no CDN, nothing from outside."""
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "http://" not in html.text and "https://" not in html.text
    linked = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', html.text)
    assert any(url.endswith(".js") for url in linked), linked
    for url in linked:
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
    spec_url = re.search(r"(?:url: |spec-url=)'?\"?(/[^'\"]+)", html.text)
    assert spec_url and client.get(spec_url[1]).json()["info"]["title"] == "imgclf"
    if page == "/docs":
        assert '"validatorUrl": null' in html.text  # no badge fetched from swagger.io


def test_web_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<input id="file" type="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


# ------------------------------------------------------------ bundle watcher
def test_watcher_sees_a_bundle_renamed_over_and_stops_with_the_app(tmp_path, bundle):
    live = tmp_path / "bundle.zip"
    replace_atomically(bundle, live)
    app = create_app(_config(live, reload_poll_seconds=0.2), LIMITS)
    with TestClient(app) as client:
        service = app_service(app)
        old = client.get("/readyz").json()["bundle_md5"]
        assert service.watching
        live.write_bytes(b"PK half a bundle")  # written in place: refused, old one kept
        error = poll(lambda: client.get("/readyz").json()["last_reload_error"], timeout=10)
        assert error is not None, "the in-place write was not seen"
        assert set(error) == {"at", "reason", "error"} and error["reason"] == FILE_CHANGED
        assert error["error"].startswith("bundle.zip: not a complete bundle (BadZipFile")
        at = datetime.strptime(error["at"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        assert abs(time.time() - at) < 30
        assert client.get("/readyz").json()["bundle_md5"] == old
        new = make_bundle(tmp_path / "staged" / "bundle.zip", seed=3)
        replace_atomically(new, live)  # as promote and `dvc checkout` do
        swapped = poll(lambda: client.get("/readyz").json()["bundle_md5"] != old, timeout=10)
        assert swapped, "the bundle renamed over the old one was not loaded"
        assert _post_raw(client, f.jpeg(1)).json()["model"]["bundle_md5"] == file_md5(new)
        assert client.get("/readyz").json()["last_reload_error"] is None
    assert not service.watching  # the lifespan stopped the watcher
