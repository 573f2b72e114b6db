"""The server's inference service: current model, admission control, batching and reload.

HTTP and TCP both call :meth:`InferenceService.classify`. It admits at most ``queue_size``
images at a time (more gets :class:`Overloaded`, i.e. 503, instead of a pile-up), decodes
them on a small thread pool with the current model's decode options, and awaits the
micro-batcher. Reloading loads and warms a new :class:`Predictor` off the event loop and
then swaps one reference: requests already holding the old predictor finish on it. A
reload that fails keeps the old predictor and is reported (``last_reload_error``) until a
later one succeeds.

The bundle file is watched with ``watchfiles`` (inotify and its kin; polling where those
are unavailable, or everywhere with ``WATCHFILES_FORCE_POLLING=1``, e.g. on a network file
system). Its folder is watched, not the file, so an atomic rename over the file (how
``promote`` and ``dvc checkout`` replace it) is seen as well as a write in place.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from watchfiles import Change, awatch

from imgclf.imaging import InvalidImage
from imgclf.params import ServeSettings
from imgclf.runtimes import EXPORT_DIR
from imgclf.serving.batching import MicroBatcher, Overloaded
from imgclf.serving.predictor import Predictor, bundle_path, is_uri

log = logging.getLogger(__name__)

FILE_CHANGED = "model files changed on disk"
STOP_TIMEOUT = 5.0  # seconds to wait for the watcher to notice it should stop

NamedImage = tuple[str, bytes | Path]  # the name to answer under, and the bytes or the file


class NotReady(RuntimeError):
    """No model is loaded yet: answer 503 until it is."""


@dataclass(frozen=True)
class ServiceConfig:
    """Knobs of the inference service (the ``serve.yaml`` settings it uses).

    ``reload_poll_seconds``: 0 turns the bundle watcher off (only SIGHUP reloads); else
    the watcher runs, and this is its polling period where it has to poll.
    """

    source: str
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    queue_size: int = 256
    decode_workers: int = 2
    reload_poll_seconds: float = 2.0
    max_pixels: int | None = None
    runtime: str = "auto"

    @classmethod
    def from_settings(cls, source: str, settings: ServeSettings) -> ServiceConfig:
        """The service's part of ``serve.yaml``, serving ``source``."""
        return cls(
            source=source,
            max_batch=settings.max_batch,
            batch_wait_ms=settings.batch_wait_ms,
            queue_size=settings.queue_size,
            decode_workers=settings.decode_workers,
            reload_poll_seconds=settings.reload_poll_seconds,
            max_pixels=settings.max_pixels,
            runtime=settings.runtime,
        )

    @property
    def watches(self) -> bool:
        """Whether the bundle file is watched (a local source and a non-zero period)."""
        return not is_uri(self.source) and self.reload_poll_seconds > 0


def settle_heap() -> None:
    """Collect, then freeze what is left (the loaded model, TensorFlow's graph) out of the
    garbage collector's sight: a full collection then no longer walks that heap, which held
    the interpreter for 210-280 ms at a time while requests waited. Unfrozen first, so a
    swapped-out model is collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _decoded_or_reason(name: str, result: np.ndarray | BaseException) -> np.ndarray | str:
    """A decoder's result: the pixels, or the reason in words when it raised."""
    if isinstance(result, InvalidImage | OSError):
        return str(result)
    if isinstance(result, Exception):  # a decoder bug on hostile input
        log.warning("decoder failed on %s: %r", name, result)
        return f"undecodable image ({type(result).__name__})"
    if isinstance(result, BaseException):
        raise result
    return result


class InferenceService:
    """Owns the served predictor and turns image bytes or paths into answers.

    Use it as ``async with InferenceService(config) as service:`` (start, then stop).
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.batcher = MicroBatcher(config.max_batch, config.batch_wait_ms, config.queue_size)
        self._decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._predictor: Predictor | None = None
        self._pending = 0
        self._reload_lock = asyncio.Lock()
        self._reloads_requested: set[asyncio.Task[bool]] = set()
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.reloads = 0
        self.last_reload_error: dict[str, Any] | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        """Whether a model is loaded (and warmed)."""
        return self._predictor is not None

    @property
    def watching(self) -> bool:
        """Whether the bundle watcher is running."""
        return self._watcher is not None and not self._watcher.done()

    @property
    def predictor(self) -> Predictor:
        """The served predictor; raises :class:`NotReady` before the first load."""
        if self._predictor is None:
            raise NotReady("model not loaded yet")
        return self._predictor

    def _load(self) -> Predictor:
        predictor = Predictor.load(self.config.source, self.config.max_pixels, self.config.runtime)
        # every power of two up to max_batch: TFLite keeps one interpreter per such size
        sizes = [1 << k for k in range(self.config.max_batch.bit_length())]
        predictor.warm((*sizes, self.config.max_batch))
        return predictor

    async def start(self) -> None:
        """Start watching the bundle, load and warm the model (failing loudly), then start
        the batcher. Watching starts first, so a bundle replaced during the load is
        reloaded after it."""
        if self.config.watches:
            self._watcher = asyncio.create_task(self._watch_bundle(), name="bundle-watcher")
            await asyncio.sleep(0)  # the task runs up to its first wait: watching
        try:
            async with self._reload_lock:
                self._predictor = await asyncio.to_thread(self._load)
        except BaseException:
            await self._stop_watching()
            raise
        settle_heap()
        await self.batcher.start()
        log.info("model ready: bundle md5 %s", self._predictor.version["bundle_md5"])

    async def stop(self) -> None:
        """Stop watching and reloading, then the batcher and the decoders."""
        await self._stop_watching()
        for task in list(self._reloads_requested):
            task.cancel()
        await asyncio.gather(*self._reloads_requested, return_exceptions=True)
        await self.batcher.stop()
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def _stop_watching(self) -> None:
        self._stopping.set()  # watchfiles checks it every 50 ms
        if self._watcher is None:
            return
        try:
            await asyncio.wait_for(self._watcher, STOP_TIMEOUT)
        except TimeoutError:  # a reload still running: wait_for cancelled it
            log.warning("the bundle watcher did not stop within %g s", STOP_TIMEOUT)

    async def __aenter__(self) -> InferenceService:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # --------------------------------------------------------------- reload
    def request_reload(self, reason: str) -> None:
        """Reload in the background (e.g. on SIGHUP); :meth:`stop` cancels it."""
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._reloads_requested.add(task)
        task.add_done_callback(self._reloads_requested.discard)

    async def reload(self, reason: str) -> bool:
        """Load and warm the model again, then swap; on failure keep serving the old one."""
        async with self._reload_lock:
            log.info("reloading model (%s)", reason)
            try:
                new = await asyncio.to_thread(self._load)
            except Exception as exc:  # whatever went wrong, keep serving the old model
                log.error("reload failed, still serving the previous model: %s", exc)
                self.last_reload_error = {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "reason": reason,
                    "error": str(exc),
                }
                return False
            was = self._predictor.version["bundle_md5"] if self._predictor else None
            self._predictor = new  # atomic swap; requests in flight keep the old one
            self.reloads += 1
            self.last_reload_error = None
            log.info("model swapped: %s -> %s", was, new.version["bundle_md5"])
        settle_heap()  # the old model, once its last request is done, is collected
        return True

    async def _watch_bundle(self) -> None:
        """Reload each time the bundle file or its exports change (a batch of changes: one
        reload), until :meth:`stop`. A deleted file is not reloaded: its replacement will be."""
        bundle = bundle_path(self.config.source)
        folder = bundle.parent.resolve()  # not the file: it may be a link DVC replaces
        exports = folder / EXPORT_DIR

        def is_bundle(change: Change, path: str) -> bool:
            changed = Path(path)
            return changed == folder / bundle.name or exports in (changed, changed.parent)

        changes = awatch(
            folder,
            watch_filter=is_bundle,
            recursive=True,
            poll_delay_ms=int(self.config.reload_poll_seconds * 1000),
            stop_event=self._stopping,
        )
        try:
            async for _ in changes:
                if bundle.is_file():
                    await self.reload(FILE_CHANGED)
        except Exception as exc:  # e.g. the folder was removed: SIGHUP still reloads
            log.error("stopped watching %s (%s); SIGHUP still reloads", folder, exc)

    # ------------------------------------------------------------ inference
    async def classify(self, items: Sequence[NamedImage]) -> tuple[list[dict[str, Any]], Predictor]:
        """Answer per image (``describe()`` fields, or ``{"error": reason}`` if undecodable)
        and the predictor that answered.

        Raises :class:`NotReady` before a model is loaded and :class:`Overloaded` when
        admitting ``items`` would exceed ``queue_size``.
        """
        predictor = self.predictor  # every image of this request uses one model
        if self._pending + len(items) > self.config.queue_size:
            raise Overloaded(f"server busy ({self._pending} images in progress)")
        self._pending += len(items)
        try:
            return await self._classify(predictor, items), predictor
        finally:
            self._pending -= len(items)

    async def _classify(
        self, predictor: Predictor, items: Sequence[NamedImage]
    ) -> list[dict[str, Any]]:
        """Decode ``items`` on the decoder pool, then run the decodable ones through the
        batcher."""
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decoders, predictor.decode_image, source)
              for _, source in items),
            return_exceptions=True,
        )  # fmt: skip
        answers: list[dict[str, Any]] = [{"name": name} for name, _ in items]
        to_infer: list[tuple[dict[str, Any], np.ndarray]] = []
        for answer, result in zip(answers, decoded, strict=True):
            pixels = _decoded_or_reason(answer["name"], result)
            if isinstance(pixels, str):
                answer["error"] = pixels
            else:
                to_infer.append((answer, pixels))
        if to_infer:
            futures = self.batcher.submit(predictor, [pixels for _, pixels in to_infer])
            for (answer, _), described in zip(
                to_infer, await asyncio.gather(*futures), strict=True
            ):
                answer.update(described)
        return answers
