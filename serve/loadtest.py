"""Measure a running server: single-request latency and throughput under concurrency.

    python serve/loadtest.py --url http://127.0.0.1:8000 --image some.jpg \\
        --concurrency 16 --requests 2000

Prints one JSON line: p50/p95/p99 latency (ms) of sequential single requests, then the
throughput (requests/s) and latency percentiles at the given concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(client: httpx.AsyncClient, data: bytes) -> float:
    start = time.perf_counter()
    r = await client.post("/predict", content=data, headers={"Content-Type": "image/jpeg"})
    r.raise_for_status()
    return (time.perf_counter() - start) * 1000


async def measure(url: str, data: bytes, concurrency: int, requests: int, single: int) -> dict:
    """Sequential latency over ``single`` requests, then ``requests`` at ``concurrency``."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for _ in range(20):  # warm connections and caches
            await _one(client, data)
        seq = [await _one(client, data) for _ in range(single)]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        latencies: list[float] = []

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                latencies.append(await _one(client, data))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "single_p50_ms": round(statistics.median(seq), 2),
        "single_p95_ms": round(_pct(seq, 0.95), 2),
        "concurrency": concurrency,
        "throughput_rps": round(requests / elapsed, 1),
        "concurrent_p50_ms": round(statistics.median(latencies), 2),
        "concurrent_p95_ms": round(_pct(latencies, 0.95), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--single", type=int, default=300, help="sequential requests for latency")
    args = ap.parse_args(argv)
    data = args.image.read_bytes()
    result = asyncio.run(measure(args.url, data, args.concurrency, args.requests, args.single))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
