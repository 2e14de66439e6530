"""Server counters, rendered in the Prometheus text format (version 0.0.4) for /metrics."""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

# Upper bounds (seconds) of the time-to-first-token histogram.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Tokens/s is the rate over this many recent seconds.
RATE_WINDOW_S = 10.0


class Metrics:
    """Thread-safe counters: the scheduler thread and the HTTP handlers both update them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = self.generated_tokens = 0
        self.queue_depth = self.batch_occupancy = self.batch_occupancy_max = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.errors: Counter = Counter()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode iterations

    def record_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def record_error(self, message: str) -> None:
        with self._lock:
            self.errors[message] += 1

    def add_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_generated_tokens(self, n: int, now: float) -> None:
        with self._lock:
            self.generated_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds

    def set_occupancy(self, rows: int) -> None:
        with self._lock:
            self.batch_occupancy = rows
            self.batch_occupancy_max = max(self.batch_occupancy_max, rows)

    def set_queue_depth(self, jobs: int) -> None:
        with self._lock:
            self.queue_depth = jobs

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if t >= now - RATE_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = ["# HELP mambakit_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE mambakit_requests_total counter"]
            lines += [f'mambakit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            for name, kind, value, help_ in (
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens prefilled."),
                ("generation_tokens_total", "counter", self.generated_tokens, "Tokens generated."),
                ("queue_depth", "gauge", self.queue_depth, "Jobs waiting for a batch row."),
                ("batch_occupancy", "gauge", self.batch_occupancy, "Rows in the decode batch now."),
                ("batch_occupancy_max", "gauge", self.batch_occupancy_max, "Most rows ever decoded together."),
                ("tokens_per_second", "gauge", round(rate, 3),
                 f"Generated tokens/s over the last {RATE_WINDOW_S:g} s."),
                ("scheduler_errors_total", "counter", sum(self.errors.values()), "Model failures in the scheduler."),
            ):
                lines += [f"# HELP mambakit_{name} {help_}", f"# TYPE mambakit_{name} {kind}",
                          f"mambakit_{name} {value}"]
            lines += ["# HELP mambakit_time_to_first_token_seconds From arrival to the first generated token.",
                      "# TYPE mambakit_time_to_first_token_seconds histogram"]
            total = 0
            for bound, count in zip((*TTFT_BUCKETS, "+Inf"), self.ttft_counts):
                total += count
                lines.append(f'mambakit_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
            lines += [f"mambakit_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"mambakit_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"
