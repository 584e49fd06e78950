"""Prometheus text-format metrics for ``fedtune serve`` (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counts by endpoint and status, a latency histogram per endpoint, token totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS_S))
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1
            i = bisect.bisect_left(BUCKETS_S, seconds)
            if i < len(BUCKETS_S):
                self._buckets[endpoint][i] += 1
            else:
                self._buckets[endpoint]  # creates the row, so +Inf is reported
            self._sum[endpoint] += seconds
            self._count[endpoint] += 1

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP fedtune_requests_total HTTP requests by endpoint and status code.",
                "# TYPE fedtune_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'fedtune_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += self._histogram_lines()
            lines += [
                "# HELP fedtune_prompt_tokens_total Prompt tokens processed.",
                "# TYPE fedtune_prompt_tokens_total counter",
                f"fedtune_prompt_tokens_total {self.prompt_tokens}",
                "# HELP fedtune_generated_tokens_total Completion tokens generated.",
                "# TYPE fedtune_generated_tokens_total counter",
                f"fedtune_generated_tokens_total {self.completion_tokens}",
            ]
        return "\n".join(lines) + "\n"

    def _histogram_lines(self) -> list[str]:
        name = "fedtune_request_duration_seconds"
        lines = [f"# HELP {name} Request latency.", f"# TYPE {name} histogram"]
        for endpoint in sorted(self._buckets):
            cumulative = 0
            for bound, n in zip(BUCKETS_S, self._buckets[endpoint], strict=True):
                cumulative += n
                lines.append(f'{name}_bucket{{endpoint="{endpoint}",le="{bound}"}} {cumulative}')
            count = self._count[endpoint]
            lines.append(f'{name}_bucket{{endpoint="{endpoint}",le="+Inf"}} {count}')
            lines.append(f'{name}_sum{{endpoint="{endpoint}"}} {self._sum[endpoint]:.6f}')
            lines.append(f'{name}_count{{endpoint="{endpoint}"}} {count}')
        return lines
