"""GET /metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters, the engine's gauges
and counters (asked of the engine loop at each scrape), and histograms of latency. Everything here runs on the
event loop thread, so it needs no lock."""

from __future__ import annotations

import bisect
from collections import Counter

from dsv3.serve.client import Generation

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


class Metrics:
    def __init__(self, endpoints: set[str]):
        self.endpoints = endpoints  # paths outside it are counted as "other", so random URLs add no series
        self.responses: Counter[tuple[str, int]] = Counter()
        self.time_to_first_token = Histogram("dsv3_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first generated token.")
        self.time_per_output_token = Histogram("dsv3_time_per_output_token_seconds",
                                               "Mean time between a request's generated tokens after the first.")
        self.request_latency = Histogram("dsv3_request_latency_seconds", "Time from arrival to the last token.")

    def count_response(self, path: str, status: int) -> None:
        self.responses[(path if path in self.endpoints else "other", status)] += 1

    def observe(self, generation: Generation) -> None:
        if generation.first_token_at is None or generation.finished_at is None:
            return
        self.time_to_first_token.observe(generation.first_token_at - generation.arrival)
        self.request_latency.observe(generation.finished_at - generation.arrival)
        per_sequence = generation.num_tokens / len(generation.request_ids)
        if per_sequence > 1:
            decode_time = generation.finished_at - generation.first_token_at
            self.time_per_output_token.observe(decode_time / (per_sequence - 1))

    def snapshot(self) -> dict:
        """This front-end's counters, to be added into another's /metrics (serve --api-servers N)."""
        return {"responses": dict(self.responses),
                "histograms": {h.name: (list(h.counts), h.sum, h.count) for h in self.histograms}}

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        return self.time_to_first_token, self.time_per_output_token, self.request_latency

    def render(self, engine: dict[str, float], others: list[dict] = ()) -> str:
        """engine: the engine's numbers (engine_loop.engine_stats); others: the other front-ends' snapshots."""
        responses = Counter(self.responses)
        histograms = {h.name: Histogram(h.name, h.help_text, h.buckets) for h in self.histograms}
        for h in self.histograms:
            merged = histograms[h.name]
            merged.counts, merged.sum, merged.count = list(h.counts), h.sum, h.count
        for other in others:
            responses.update(other["responses"])
            for name, (counts, total, count) in other["histograms"].items():
                merged = histograms[name]
                merged.counts = [a + b for a, b in zip(merged.counts, counts)]
                merged.sum, merged.count = merged.sum + total, merged.count + count
        lines = ["# HELP dsv3_requests_total HTTP responses by endpoint and status code.",
                 "# TYPE dsv3_requests_total counter"]
        lines += [f'dsv3_requests_total{{endpoint="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(responses.items())]
        for name, kind, help_text, value in [
            ("dsv3_prompt_tokens_total", "counter", "Prompt tokens admitted.", engine["prompt_tokens"]),
            ("dsv3_generation_tokens_total", "counter", "Tokens generated.", engine["generation_tokens"]),
            ("dsv3_requests_running", "gauge", "Sequences being decoded.", engine["running"]),
            ("dsv3_requests_waiting", "gauge", "Sequences waiting for room in the batch.", engine["waiting"]),
            ("dsv3_cache_usage_ratio", "gauge", "Fraction of latent cache blocks in use.", engine["cache_usage"]),
            ("dsv3_cache_blocks_free", "gauge", "Free latent cache blocks.", engine["blocks_free"]),
            ("dsv3_cache_blocks_total", "gauge", "Latent cache blocks.", engine["blocks_total"]),
            ("dsv3_preemptions_total", "counter", "Sequences preempted for cache room.", engine["preemptions"]),
            ("dsv3_spec_draft_tokens_total", "counter", "Tokens drafted by the MTP module.", engine["spec_drafted"]),
            ("dsv3_spec_accepted_tokens_total", "counter", "Drafted tokens the main model accepted.",
             engine["spec_accepted"]),
            ("dsv3_spec_acceptance_ratio", "gauge", "Accepted / drafted tokens so far.",
             engine["spec_accepted"] / max(engine["spec_drafted"], 1)),
            ("dsv3_spec_off_steps_total", "counter",
             "Steps that did not draft: the batch was large, or speculation was measured slower there.",
             engine["spec_off_steps"]),
            ("dsv3_spec_off_sequences_total", "counter", "Sequences that stopped drafting: their drafts rarely stood.",
             engine["spec_off_sequences"]),
            ("dsv3_engine_steps_total", "counter", "Engine steps.", engine["steps"]),
            ("dsv3_engine_prefill_steps_total", "counter", "Engine steps that prefilled (prompt tokens beside or "
             "instead of decoding ones).", engine["prefill_steps"]),
            ("dsv3_engine_gpu_wait_seconds_total", "counter", "Engine time spent waiting for steps' results on the GPU "
             "(little of the loop's time: the host is the bottleneck).", engine["gpu_wait_seconds"]),
            ("dsv3_engine_step_seconds_total", "counter", "Engine loop time spent in steps.",
             engine.get("loop_step_seconds", 0.0)),
            ("dsv3_engine_publish_seconds_total", "counter", "Engine loop time spent making the updates it sends.",
             engine.get("loop_publish_seconds", 0.0)),
        ]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for histogram in histograms.values():
            lines += histogram.render()
        return "\n".join(lines) + "\n"
