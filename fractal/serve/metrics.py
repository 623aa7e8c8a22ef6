"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated from two threads (the HTTP event loop and the engine thread), so
every family holds a lock. Names follow Prometheus habits: `fractal_` prefix, `_total` for counters,
`_seconds` for durations. Gauges that mirror the engine (running batch, waiting queue, KV blocks,
prefix hit rate) are set from `LLMEngine.get_stats()` snapshots taken by the engine thread.
"""
from __future__ import annotations

import bisect
import math
import threading

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name, help_text, labelnames=()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Family):
    kind = "gauge"

    def __init__(self, name, help_text):
        super().__init__(name, help_text)
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self._value)}"]


class EngineCounter(Gauge):
    """A counter the engine keeps (set from its snapshots rather than incremented here)."""

    kind = "counter"


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name, help_text, buckets):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last one: above every bound
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
            self._count += 1

    def count(self) -> int:
        with self._lock:
            return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines, running = self.header(), 0
        for bound, c in zip(self.buckets + (math.inf,), counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {count}"]
        return lines


class ServerMetrics:
    """Every metric `/metrics` exposes. Engine gauges come from `update_engine_stats`."""

    def __init__(self) -> None:
        self.requests = Counter("fractal_requests_total", "Requests finished, by endpoint and finish reason "
                                "(stop, length, abort, error).", ("endpoint", "finish_reason"))
        self.http_errors = Counter("fractal_http_errors_total", "Error responses, by HTTP status.", ("status",))
        self.rejected = Counter("fractal_requests_rejected_total", "Requests refused because the queue was full.")
        self.prompt_tokens = Counter("fractal_prompt_tokens_total", "Prompt tokens admitted.")
        self.generation_tokens = Counter("fractal_generation_tokens_total", "Tokens generated.")
        self.in_flight = Gauge("fractal_requests_in_flight", "Requests admitted by the server and not finished.")
        self.num_running = Gauge("fractal_num_requests_running", "Sequences in the engine's running batch.")
        self.num_waiting = Gauge("fractal_num_requests_waiting", "Sequences waiting in the engine's queue.")
        self.kv_blocks_used = Gauge("fractal_kv_cache_blocks_used", "KV-cache blocks held by sequences.")
        self.kv_blocks_total = Gauge("fractal_kv_cache_blocks_total", "KV-cache blocks in the pool.")
        self.kv_usage = Gauge("fractal_kv_cache_usage_ratio", "KV-cache blocks used / total (0..1).")
        self.prefix_hit_rate = Gauge("fractal_prefix_cache_hit_rate", "Prompt tokens served from the prefix "
                                     "cache / prompt tokens looked up (0..1).")
        self.prefix_hits = EngineCounter("fractal_prefix_cache_hits_total", "Prompt tokens found in the prefix "
                                         "cache since start.")
        self.prefix_queries = EngineCounter("fractal_prefix_cache_queries_total", "Prompt tokens looked up in "
                                            "the prefix cache since start.")
        self.preemptions = EngineCounter("fractal_num_preemptions_total", "Sequences preempted (KV dropped "
                                         "from the GPU) since start.")
        self.swapped_out = EngineCounter("fractal_num_swapped_out_total", "Of those, sequences whose KV went to "
                                         "the swap space (resumed without recompute).")
        self.balance_swaps = EngineCounter("fractal_num_balance_swaps_total", "Of those, running sequences "
                                           "swapped out for lagging ones (preemption balancing).")
        self.step_time = Gauge("fractal_engine_last_step_seconds", "Wall time of the engine's last model step.")
        self.engine_steps = Counter("fractal_engine_steps_total", "Engine steps run.")
        self.step_floor = Gauge("fractal_engine_last_step_floor_seconds", "Four-resource floor of the last step "
                                "on --floor-gpu (0 without it).")
        self.step_floor_ratio = Gauge("fractal_engine_last_step_floor_ratio", "Last step's wall time / its floor "
                                      "(1 = at the floor; 0 without --floor-gpu).")
        self.step_time_total = EngineCounter("fractal_engine_step_seconds_total", "Wall time of all engine steps.")
        self.step_floor_total = EngineCounter("fractal_engine_step_floor_seconds_total", "Four-resource floors of "
                                              "all engine steps; rate(floor) / rate(step) is the share of the "
                                              "GPU's limit reached.")
        self.ttft = Histogram("fractal_time_to_first_token_seconds", "Arrival to first generated token.",
                              LATENCY_BUCKETS_S)
        self.tpot = Histogram("fractal_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per sequence.", LATENCY_BUCKETS_S)
        self.e2e = Histogram("fractal_e2e_request_latency_seconds", "Arrival to the request's end.",
                             LATENCY_BUCKETS_S)
        self.output_len = Histogram("fractal_request_generation_tokens", "Generated tokens per sequence.",
                                    TOKEN_BUCKETS)

    def update_engine_stats(self, stats) -> None:
        """From `LLMEngine.get_stats()` (an EngineStats; a dict with the same keys works too)."""
        get = stats.get if isinstance(stats, dict) else (lambda name, default=0: getattr(stats, name, default))
        self.num_running.set(get("num_running", 0))
        self.num_waiting.set(get("num_waiting", 0))
        used, total = get("kv_blocks_used", 0), get("kv_blocks_total", 0)
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)
        self.prefix_hit_rate.set(get("prefix_hit_rate", 0.0) or 0.0)
        self.prefix_hits.set(get("prefix_cache_hits", 0))
        self.prefix_queries.set(get("prefix_cache_queries", 0))
        self.preemptions.set(get("num_preempted_total", 0))
        self.swapped_out.set(get("num_swapped_out_total", 0))
        self.balance_swaps.set(get("num_balance_swaps_total", 0))
        self.step_time.set(get("last_step_time_s", 0.0) or 0.0)
        floor = get("last_step_floor_s", None) or 0.0
        self.step_floor.set(floor)
        self.step_floor_ratio.set((get("last_step_time_s", 0.0) or 0.0) / floor if floor else 0.0)
        self.step_time_total.set(get("step_time_total_s", 0.0) or 0.0)
        self.step_floor_total.set(get("step_floor_total_s", 0.0) or 0.0)

    def render(self) -> str:
        families = [self.requests, self.http_errors, self.rejected, self.prompt_tokens, self.generation_tokens,
                    self.in_flight, self.num_running, self.num_waiting, self.kv_blocks_used,
                    self.kv_blocks_total, self.kv_usage, self.prefix_hit_rate, self.prefix_hits,
                    self.prefix_queries, self.preemptions, self.swapped_out, self.balance_swaps, self.step_time,
                    self.engine_steps, self.step_floor, self.step_floor_ratio, self.step_time_total,
                    self.step_floor_total, self.ttft, self.tpot, self.e2e, self.output_len]
        lines: list[str] = []
        for family in families:
            lines += family.render()
        return "\n".join(lines) + "\n"
