"""Worker metrics: queue depth, running rows, tokens/s, latency histograms.

Plain counters and fixed-bucket histograms, thread-safe, with a Prometheus text
rendering for whoever publishes them.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    _recent: deque = field(default_factory=lambda: deque(maxlen=1000))

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1
        self._recent.append(value)

    def quantile(self, q: float) -> float | None:
        """Quantile over the last 1,000 observations."""
        if not self._recent:
            return None
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Metrics:
    """Everything the worker reports; safe to read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram()
        self.latency = Histogram()
        self.queue_depth = 0
        self.running = 0
        self.tokens_total = 0
        self.requests: dict[str, int] = {}  # by outcome: ok, failed, cancelled, expired, rejected
        self._token_times: deque[tuple[float, int]] = deque(maxlen=256)

    def tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_total += n
            self._token_times.append((time.monotonic(), n))

    def outcome(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

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
                "queue_depth": self.queue_depth, "running": self.running, "tokens_total": self.tokens_total,
                "requests": dict(self.requests),
                "ttft_p50_s": self.ttft.quantile(0.5), "ttft_p95_s": self.ttft.quantile(0.95),
                "latency_p50_s": self.latency.quantile(0.5), "latency_p95_s": self.latency.quantile(0.95),
                "tokens_per_s": rate,
            }

    def to_prometheus(self, prefix: str = "storygen") -> str:
        lines = [f"{prefix}_queue_depth {self.queue_depth}", f"{prefix}_running_rows {self.running}",
                 f"{prefix}_tokens_total {self.tokens_total}", f"{prefix}_tokens_per_second {self.tokens_per_s():.3f}"]
        with self._lock:
            for kind, n in sorted(self.requests.items()):
                lines.append(f'{prefix}_requests_total{{outcome="{kind}"}} {n}')
            for name, hist in (("ttft_seconds", self.ttft), ("latency_seconds", self.latency)):
                cumulative = 0
                for bound, count in zip((*hist.buckets, float("inf")), hist.counts):
                    cumulative += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'{prefix}_{name}_bucket{{le="{le}"}} {cumulative}')
                lines += [f"{prefix}_{name}_sum {hist.total:.6f}", f"{prefix}_{name}_count {hist.n}"]
        return "\n".join(lines) + "\n"
