"""Worker metrics, as Prometheus metrics (prometheus-client) plus the recent figures the worker reads.

    storygen_queue_depth                     gauge: stories waiting for a slot
    storygen_running_rows                    gauge: stories being written now
    storygen_tokens_generated_total          counter
    storygen_stories_total{frontend,outcome} counter: done, cancelled, failed, expired, refused
    storygen_ttft_seconds{frontend}          histogram: submit to first token
    storygen_latency_seconds{frontend}       histogram: submit to the finished story
    storygen_prefix_cache_queried_tokens_total  counter: prompt tokens looked up in the prefix cache
    storygen_prefix_cache_hit_tokens_total   counter: those found there, not computed again
    storygen_prefix_cache_bytes              gauge: keys and values it holds (STORYGEN_PREFIX_CACHE_MB)

With remote generation servers (STORYGEN_BACKEND=openai), per server (`backend` is its base URL):

    storygen_backend_up{backend}             gauge: 1 in rotation, 0 taken out
    storygen_backend_inflight{backend}       gauge: requests streaming from it now
    storygen_backend_requests_total{backend} counter: requests sent (a resumed story sends another)
    storygen_backend_errors_total{backend,kind}  counter: refused, timeout, status, malformed, cut
    storygen_backend_ttft_seconds{backend}   histogram: request to its first text
    storygen_resumed_total                   counter: stories moved to another server mid-way

`frontend` is the first part of the request's user key (discord, slack, api, storytime,
cli). Each Metrics has its own registry, so several workers in one process (tests, the
benchmark) don't collide; `bot.web` serves the running worker's with `to_prometheus()`.
The quantiles in `snapshot()` come from the last 1,000 observations, for health and
benchmarks; Prometheus users compute theirs from the histograms.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
OUTCOMES = ("done", "cancelled", "failed", "expired", "refused")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def frontend_of(user_key: str) -> str:
    """`discord:<guild>:<user>` -> `discord`: the label, without anyone's id in it."""
    return user_key.split(":", 1)[0] or "unknown"


class _Recent:
    """The last observations, for quantiles without scraping."""

    def __init__(self, size: int = 1000) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._values.append(value)

    def quantile(self, q: float) -> float | None:
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _PrefixCacheCollector:
    """The prefix cache's own counters, read when Prometheus scrapes (the engine keeps them; prefix_cache.py)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.source: Callable[[], object | None] = lambda: None  # -> the engine's PrefixCache, or None

    def collect(self) -> Iterator[Metric]:
        cache = self.source()
        if cache is None:
            return
        yield CounterMetricFamily(f"{self.prefix}_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache", value=cache.lookups)
        yield CounterMetricFamily(f"{self.prefix}_prefix_cache_hit_tokens",
                                  "Prompt tokens found in the prefix cache, not computed again", value=cache.hits)
        yield GaugeMetricFamily(f"{self.prefix}_prefix_cache_bytes", "Bytes of keys and values in the prefix cache",
                                value=cache.bytes)


class Metrics:
    """Everything the worker reports; safe to update and read from any thread."""

    def __init__(self, prefix: str = "storygen") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._queue = Gauge(f"{prefix}_queue_depth", "Stories waiting for a slot", registry=self.registry)
        self._running = Gauge(f"{prefix}_running_rows", "Stories being written now", registry=self.registry)
        self._tokens = Counter(f"{prefix}_tokens_generated", "Tokens generated", registry=self.registry)
        self._stories = Counter(f"{prefix}_stories", "Stories by front-end and outcome",
                                ("frontend", "outcome"), registry=self.registry)
        self._ttft = Histogram(f"{prefix}_ttft_seconds", "Seconds from submit to the first token",
                               ("frontend",), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._latency = Histogram(f"{prefix}_latency_seconds", "Seconds from submit to the finished story",
                                  ("frontend",), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._backend_up = Gauge(f"{prefix}_backend_up", "1 while a generation server is in rotation",
                                 ("backend",), registry=self.registry)
        self._backend_inflight = Gauge(f"{prefix}_backend_inflight", "Requests streaming from a server now",
                                       ("backend",), registry=self.registry)
        self._backend_requests = Counter(f"{prefix}_backend_requests", "Requests sent to a server",
                                         ("backend",), registry=self.registry)
        self._backend_errors = Counter(f"{prefix}_backend_errors", "Failures of a server, by kind",
                                       ("backend", "kind"), registry=self.registry)
        self._backend_ttft = Histogram(f"{prefix}_backend_ttft_seconds", "Seconds from request to a server's "
                                       "first text", ("backend",), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._resumed = Counter(f"{prefix}_resumed", "Stories moved to another server mid-way",
                                registry=self.registry)
        self._prefix_cache = _PrefixCacheCollector(prefix)
        self.registry.register(self._prefix_cache)
        self._lock = threading.Lock()
        self._recent_ttft = _Recent()
        self._recent_latency = _Recent()
        self._outcomes: dict[str, int] = {}
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)
        self._queue_depth = 0
        self._running_rows = 0
        self.tokens_total = 0

    # --- updates (the worker) -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    @queue_depth.setter
    def queue_depth(self, n: int) -> None:
        self._queue_depth = n
        self._queue.set(n)

    @property
    def running(self) -> int:
        return self._running_rows

    @running.setter
    def running(self, n: int) -> None:
        self._running_rows = n
        self._running.set(n)

    def tokens(self, n: int) -> None:
        if not n:
            return
        self._tokens.inc(n)
        with self._lock:
            self.tokens_total += n
            self._token_times.append((time.monotonic(), n))

    def outcome(self, kind: str, user_key: str = "") -> None:
        self._stories.labels(frontend_of(user_key), kind).inc()
        with self._lock:
            self._outcomes[kind] = self._outcomes.get(kind, 0) + 1

    def observe_ttft(self, seconds: float, user_key: str = "") -> None:
        self._ttft.labels(frontend_of(user_key)).observe(seconds)
        with self._lock:
            self._recent_ttft.add(seconds)

    def observe_latency(self, seconds: float, user_key: str = "") -> None:
        self._latency.labels(frontend_of(user_key)).observe(seconds)
        with self._lock:
            self._recent_latency.add(seconds)

    def backend_state(self, backend: str, up: bool, inflight: int) -> None:
        self._backend_up.labels(backend).set(1 if up else 0)
        self._backend_inflight.labels(backend).set(inflight)

    def backend_request(self, backend: str) -> None:
        self._backend_requests.labels(backend).inc()

    def backend_error(self, backend: str, kind: str) -> None:
        self._backend_errors.labels(backend, kind).inc()

    def backend_ttft(self, backend: str, seconds: float) -> None:
        self._backend_ttft.labels(backend).observe(seconds)

    def resumed(self) -> None:
        self._resumed.inc()

    def watch_prefix_cache(self, source: Callable[[], object | None]) -> None:
        """Report the prefix cache `source()` returns (None: none, nothing reported) at each scrape."""
        self._prefix_cache.source = source

    # --- reading ----------------------------------------------------------------------------------

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        with self._lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._token_times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = max(recent[-1][0] - recent[0][0], 1e-6)
        return sum(n for _, n in recent[1:]) / span

    def snapshot(self) -> dict:
        rate = self.tokens_per_s()
        with self._lock:
            return {
                "queue_depth": self._queue_depth, "running": self._running_rows, "tokens_total": self.tokens_total,
                "requests": dict(self._outcomes),
                "ttft_p50_s": self._recent_ttft.quantile(0.5), "ttft_p95_s": self._recent_ttft.quantile(0.95),
                "latency_p50_s": self._recent_latency.quantile(0.5),
                "latency_p95_s": self._recent_latency.quantile(0.95),
                "tokens_per_s": rate,
            }

    def to_prometheus(self) -> str:
        """The Prometheus text exposition format (serve it as PROMETHEUS_CONTENT_TYPE)."""
        return generate_latest(self.registry).decode("utf-8")
