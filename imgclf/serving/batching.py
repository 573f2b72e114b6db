"""Micro-batching: images from concurrent requests gathered into one model call.

Requests put decoded images on a bounded queue and await a future. One worker takes the
first waiting image, then keeps taking more until ``max_batch`` images or ``wait_ms`` have
passed, and runs them through the predictor in a single call on the one inference thread.
Each item carries the predictor that decoded it, so during a model swap a batch is split by
model and in-flight images finish on the model they were prepared for.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgclf.serving.predictor import Predictor

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full: answer 503 rather than pile up work."""


@dataclass
class _QueuedImage:
    """One decoded image waiting for the model that decoded it, and its answer's future."""

    predictor: Predictor
    array: np.ndarray
    future: asyncio.Future[dict[str, Any]]


class MicroBatcher:
    """Bounded queue plus one worker that runs gathered images in one compiled call."""

    def __init__(self, max_batch: int = 32, wait_ms: float = 0.0, queue_size: int = 256):
        if max_batch < 1 or queue_size < 1 or wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1, wait_ms >= 0")
        self.max_batch = max_batch
        self.wait = wait_ms / 1000.0
        self.queue_size = queue_size
        self._queue: asyncio.Queue[_QueuedImage] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.batches = 0
        self.images = 0

    async def start(self) -> None:
        """Start the worker (on the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._worker = asyncio.create_task(self._run_batches(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the worker and the inference thread."""
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, predictor: Predictor, arrays: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue all of ``arrays`` or none; raises :class:`Overloaded` when they don't fit."""
        assert self._queue is not None, "start() the batcher first"
        if self._queue.maxsize - self._queue.qsize() < len(arrays):
            raise Overloaded(f"inference queue full ({self._queue.qsize()} images waiting)")
        loop = asyncio.get_running_loop()
        futures = []
        for array in arrays:
            queued = _QueuedImage(predictor, array, loop.create_future())
            self._queue.put_nowait(queued)
            futures.append(queued.future)
        return futures

    async def _next_batch(self) -> list[_QueuedImage]:
        """Wait for one image, then take more until ``max_batch`` or ``wait_ms`` is up."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run_batches(self) -> None:
        """The worker: each batch, split by model, in one call per model."""
        while True:
            by_model: dict[int, list[_QueuedImage]] = {}
            for queued in await self._next_batch():
                if not queued.future.done():  # the client may have gone away
                    by_model.setdefault(id(queued.predictor), []).append(queued)
            for images in by_model.values():
                await self._infer(images)

    async def _infer(self, images: list[_QueuedImage]) -> None:
        """Run images of one model in one call; settle each future with its answer."""
        predictor = images[0].predictor
        stacked = np.stack([queued.array for queued in images])
        loop = asyncio.get_running_loop()
        try:
            probs = await loop.run_in_executor(self._executor, predictor.predict_arrays, stacked)
        except Exception as exc:
            log.exception("inference failed on a batch of %d", len(images))
            for queued in images:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(images)
        for queued, row in zip(images, probs, strict=True):
            if not queued.future.done():
                queued.future.set_result(predictor.describe(row))
