"""The server's inference service: current model, admission control, batching and reload.

HTTP and TCP both call :meth:`InferenceService.classify`. It admits at most ``queue_size``
images at a time (more gets :class:`Overloaded`, i.e. 503, instead of a pile-up), decodes
them on a small thread pool with the current model's decode options, and awaits the
micro-batcher. Reloading loads and warms a new :class:`Predictor` off the event loop and
then swaps one reference: requests already holding the old predictor finish on it. A
reload that fails keeps the old predictor and is reported (``last_reload_error``) until a
later one succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.imaging import InvalidImage
from imgclf.serving.batching import MicroBatcher, NotReady, Overloaded
from imgclf.serving.predictor import Predictor, bundle_path, is_uri

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int] | None, ...]


@dataclass(frozen=True)
class ServiceConfig:
    """Knobs of the inference service (the ``serve:`` params)."""

    source: str
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    queue_size: int = 256
    decode_workers: int = 2
    reload_poll_seconds: float = 2.0
    max_pixels: int | None = None


def file_signature(paths: tuple[Path, ...]) -> Signature:
    """(mtime_ns, size, inode) per file, ``None`` for a missing one."""
    sig = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            sig.append(None)
        else:
            sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sig)


class InferenceService:
    """Owns the served predictor and turns image bytes or paths into answers."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.batcher = MicroBatcher(config.max_batch, config.batch_wait_ms, config.queue_size)
        self._decoders = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._predictor: Predictor | None = None
        self._pending = 0
        self._reload_lock = asyncio.Lock()
        self._signature: Signature | None = None
        self.reloads = 0
        self.last_reload_error: dict[str, Any] | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self._predictor is not None

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise NotReady("model not loaded yet")
        return self._predictor

    def _load(self) -> Predictor:
        predictor = Predictor.load(self.config.source, self.config.max_pixels)
        predictor.warm((1, self.config.max_batch))
        return predictor

    async def start(self) -> None:
        """Load and warm the model (failing loudly), then start the batcher."""
        sig = self._current_signature()
        self._predictor = await asyncio.to_thread(self._load)
        self._signature = sig
        await self.batcher.start()
        log.info("model ready: bundle md5 %s", self._predictor.version["bundle_md5"])

    async def stop(self) -> None:
        await self.batcher.stop()
        self._decoders.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------- reload
    def _watched(self) -> tuple[Path, ...]:
        """The bundle file: the only file a model is loaded from."""
        return (bundle_path(self.config.source),)

    def _current_signature(self) -> Signature | None:
        return None if is_uri(self.config.source) else file_signature(self._watched())

    async def reload(self, reason: str) -> bool:
        """Load and warm the model again, then swap; on failure keep serving the old one."""
        async with self._reload_lock:
            sig = self._current_signature()
            log.info("reloading model (%s)", reason)
            try:
                new = await asyncio.to_thread(self._load)
            except Exception as exc:  # whatever went wrong, keep serving the old model
                log.error("reload failed, still serving the previous model: %s", exc)
                self._signature = sig  # do not retry until the file changes again
                self.last_reload_error = {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "reason": reason,
                    "error": str(exc),
                }
                return False
            old, self._predictor = self._predictor, new  # atomic swap
            self._signature = sig
            self.reloads += 1
            self.last_reload_error = None
            log.info(
                "model swapped: %s -> %s",
                old.version["bundle_md5"] if old else None,
                new.version["bundle_md5"],
            )
            return True

    async def watch(self) -> None:
        """Poll the model files; reload once a change has settled (two equal polls)."""
        if is_uri(self.config.source) or self.config.reload_poll_seconds <= 0:
            return
        seen: Signature | None = None
        while True:
            await asyncio.sleep(self.config.reload_poll_seconds)
            sig = file_signature(self._watched())
            if sig == self._signature or sig[0] is None:
                seen = None
                continue
            if sig == seen:  # unchanged since the last poll: the write has finished
                await self.reload("model files changed on disk")
                seen = None
            else:
                seen = sig

    # ------------------------------------------------------------ inference
    def _decode(self, predictor: Predictor, source: bytes | Path) -> Any:
        return predictor.decode_image(source)

    async def classify(
        self, items: list[tuple[str, bytes | Path]]
    ) -> tuple[list[dict[str, Any]], Predictor]:
        """Answer per image (``describe()`` fields, or ``{"error": reason}`` if undecodable)
        and the predictor that answered.

        Raises :class:`Overloaded` when admitting ``items`` would exceed ``queue_size``.
        """
        if not items:
            return [], self.predictor
        if self._pending + len(items) > self.config.queue_size:
            raise Overloaded(f"server busy ({self._pending} images in progress)")
        predictor = self.predictor  # every image of this request uses one model
        self._pending += len(items)
        try:
            loop = asyncio.get_running_loop()
            decoded = await asyncio.gather(
                *(
                    loop.run_in_executor(self._decoders, self._decode, predictor, src)
                    for _, src in items
                ),
                return_exceptions=True,
            )
            answers: list[dict[str, Any]] = [{"name": name} for name, _ in items]
            ok = []
            for answer, result in zip(answers, decoded, strict=True):
                if isinstance(result, InvalidImage | OSError):
                    answer["error"] = str(result)
                elif isinstance(result, Exception):  # a decoder bug on hostile input
                    log.warning("decoder failed on %s: %r", answer["name"], result)
                    answer["error"] = f"undecodable image ({type(result).__name__})"
                elif isinstance(result, BaseException):
                    raise result
                else:
                    ok.append((answer, result))
            if ok:
                futures = self.batcher.submit(predictor, [array for _, array in ok])
                for (answer, _), res in zip(ok, await asyncio.gather(*futures), strict=True):
                    answer.update(res)
            return answers, predictor
        finally:
            self._pending -= len(items)
