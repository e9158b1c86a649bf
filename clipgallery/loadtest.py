"""`clipgallery loadtest`: many concurrent clients against a running app, over HTTP.

Each client sends a query drawn from a fixed list of distinct queries, waits `pause` seconds,
and repeats until the time is up; the mixed run also sends image queries and page loads. The
run is bounded in clients, time and requests, and only ever targets the URL it is given (use
loopback). It reports the error count and latency percentiles.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import time
from dataclasses import dataclass, field

COLOURS = ["red", "blue", "green", "black", "white", "yellow", "brown", "grey", "pink", "orange"]
THINGS = [
    "dog",
    "cat",
    "car",
    "church",
    "fish",
    "shoes",
    "watch",
    "dress",
    "truck",
    "parachute",
    "golf ball",
    "radio",
    "saw",
    "horn",
    "bag",
    "shirt",
    "hat",
    "bicycle",
    "boat",
    "house",
    "tree",
    "flower",
    "bird",
    "mountain",
    "beach",
]
PLACES = ["", " on a beach", " in the snow", " at night"]


def distinct_queries(count: int = 500, seed: int = 0) -> list[str]:
    """`count` different, plausible text queries (deterministic)."""
    queries = [f"a {c} {t}{p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]
    random.Random(seed).shuffle(queries)
    if count > len(queries):
        raise ValueError(f"at most {len(queries)} distinct queries")
    return queries[:count]


@dataclass
class LoadReport:
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, kind: str, ms: float, ok: bool, detail: str = "") -> None:
        self.requests += 1
        self.latencies_ms.setdefault(kind, []).append(ms)
        if not ok:
            self.errors += 1
            if len(self.error_samples) < 10:
                self.error_samples.append(detail)

    @staticmethod
    def percentile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0

    def lines(self) -> list[str]:
        all_ms = [ms for values in self.latencies_ms.values() for ms in values]
        out = [
            f"{self.requests} requests in {self.seconds:.0f} s ({self.requests / max(self.seconds, 1e-9):.1f}/s), "
            f"{self.errors} errors",
            "| kind | requests | p50 ms | p95 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, values in [*sorted(self.latencies_ms.items()), ("all", all_ms)]:
            out.append(
                f"| {kind} | {len(values)} | {self.percentile(values, 50):.0f} | {self.percentile(values, 95):.0f} | "
                f"{self.percentile(values, 99):.0f} | {max(values, default=0):.0f} |"
            )
        out += [f"error: {sample}" for sample in self.error_samples]
        return out


def _sample_image() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((224, 224), 60).convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


async def run_load(
    base_url: str,
    clients: int = 50,
    seconds: float = 60.0,
    pause: float = 0.5,
    mixed: bool = False,
    queries: int = 500,
    max_requests: int = 100_000,
) -> LoadReport:
    import httpx

    if not 1 <= clients <= 500 or not 0 < seconds <= 3600:
        raise ValueError("clients must be 1..500 and seconds 1..3600")
    words = distinct_queries(queries)
    image = _sample_image() if mixed else b""
    report = LoadReport()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one_client(number: int) -> None:
            rng = random.Random(number)
            while time.monotonic() < deadline and report.requests < max_requests:
                roll = rng.random()
                started = time.perf_counter()
                try:
                    if mixed and roll < 0.15:
                        kind = "image query"
                        files = {"file": ("q.jpg", image, "image/jpeg")}
                        response = await client.post("/api/search/image", files=files, params={"k": 20})
                    elif mixed and roll < 0.30:
                        kind = "page load"
                        response = await client.get("/")
                    else:
                        kind = "text query"
                        response = await client.get("/api/search", params={"q": rng.choice(words), "k": 20})
                    ok = response.status_code == 200
                    detail = f"{kind}: HTTP {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail = False, f"{kind}: {type(exc).__name__}: {exc}"
                report.add(kind, (time.perf_counter() - started) * 1000, ok, detail)
                await asyncio.sleep(pause)

        started = time.monotonic()
        await asyncio.gather(*(one_client(n) for n in range(clients)))
        report.seconds = time.monotonic() - started
    return report
