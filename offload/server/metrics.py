"""Counters of the server and the expert store: Prometheus text at GET /metrics, and the
live figures of the running reply for the web page's panel.

Written by the worker thread (one generation at a time), read by the event loop; plain ints
and floats, so a reader sees a value that is at most one token old.
"""

from __future__ import annotations

import time
from collections import Counter

import psutil

from ..model import _peak_rss
from ..store import TieredExperts


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter = Counter()  # (route, status code) -> count
        self.prompt_tokens = 0  # the whole rendered prompt of every request
        self.prompt_tokens_run = 0  # of those, the ones run through the model (not found in the KV cache)
        self.completion_tokens = 0
        self.prompt_seconds = 0.0
        self.decode_seconds = 0.0
        self.generations = 0
        self.cancelled = 0  # generations stopped early (client gone, shutdown)
        self.last_tok_s = 0.0
        self.last_ttft = 0.0
        # the reply running now (or the last one)
        self.live_running = False
        self.live_tokens = 0
        self.live_prompt_tokens = 0
        self.live_started = 0.0
        self.live_decode_started = 0.0
        self.live_store_start: dict = {}
        self.live_tok_s = 0.0
        self._process = psutil.Process()

    # -- the worker's side -------------------------------------------------------------
    def begin(self, model, prompt_tokens: int) -> None:
        self.live_running = True
        self.live_tokens = 0
        self.live_prompt_tokens = prompt_tokens
        self.live_started = self.live_decode_started = time.perf_counter()
        self.live_store_start = model.store_stats()

    def token(self) -> None:
        now = time.perf_counter()
        if self.live_tokens == 0:
            self.live_decode_started = now  # decode speed counts from the first token, after the prefill
        self.live_tokens += 1
        if self.live_tokens > 1:
            self.live_tok_s = (self.live_tokens - 1) / max(now - self.live_decode_started, 1e-9)

    def end(self, prompt_tokens: int, prompt_run: int, completion_tokens: int, prompt_seconds: float,
            decode_seconds: float, ttft: float, cancelled: bool) -> None:
        self.live_running = False
        self.generations += 1
        self.cancelled += cancelled
        self.prompt_tokens += prompt_tokens
        self.prompt_tokens_run += prompt_run
        self.completion_tokens += completion_tokens
        self.prompt_seconds += prompt_seconds
        self.decode_seconds += decode_seconds
        self.last_ttft = ttft
        if decode_seconds > 0 and completion_tokens:
            self.last_tok_s = completion_tokens / decode_seconds

    # -- the event loop's side -----------------------------------------------------------
    def live(self, model, rss_before_load: int = 0) -> dict:
        """The running (or last) reply: tokens, tok/s, expert hits/misses and MiB read per token."""
        store = model.store_stats()
        start = self.live_store_start or store
        tokens = self.live_tokens
        read = store["bytes_read"] - start.get("bytes_read", 0)
        hits = store["hits"] - start.get("hits", 0)
        misses = store["misses"] - start.get("misses", 0)
        plan = model.plan
        return {
            "running": self.live_running,
            "prompt_tokens": self.live_prompt_tokens,
            "tokens": tokens,
            "tok_s": self.live_tok_s if self.live_running else self.last_tok_s,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "bytes_read": read,
            "mib_per_token": read / 2**20 / (tokens + self.live_prompt_tokens) if tokens + self.live_prompt_tokens
            else 0.0,
            "rss_bytes": (rss := self._process.memory_info().rss),
            # what the budget governs: the process minus the interpreter and libraries before the load
            "model_rss_bytes": max(0, rss - rss_before_load),
            "memory_budget": plan.budget if plan is not None else 0,
            "cache_policy": model.experts.policy if isinstance(model.experts, TieredExperts) else "resident",
            "expert_slots": plan.slots if plan is not None and isinstance(model.experts, TieredExperts) else 0,
        }

    def prometheus(self, model, queue_depth: int, running: int, loaded: bool, rss_before_load: int = 0) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples) -> None:
            out.append(f"# HELP offload_{name} {help}")
            out.append(f"# TYPE offload_{name} {kind}")
            for labels, value in samples:
                out.append(f"offload_{name}{labels} {value:g}" if isinstance(value, float) else
                           f"offload_{name}{labels} {value}")

        metric("model_loaded", "gauge", "1 when the model is loaded and requests are served.", [("", int(loaded))])
        metric("requests_total", "counter", "HTTP requests to the API, by route and status code.",
               [(f'{{route="{r}",code="{c}"}}', n) for (r, c), n in sorted(self.requests.items())])
        metric("queue_depth", "gauge", "Requests waiting for their turn.", [("", queue_depth)])
        metric("requests_running", "gauge", "Generations running (one per parallel slot at most).",
               [("", int(running))])
        metric("generations_total", "counter", "Generations run.", [("", self.generations)])
        metric("generations_cancelled_total", "counter", "Generations stopped early (client gone, shutdown).",
               [("", self.cancelled)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of every request.", [("", self.prompt_tokens)])
        metric("prompt_tokens_run_total", "counter", "Prompt tokens run through the model (not reused from the "
               "KV cache).", [("", self.prompt_tokens_run)])
        metric("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
        metric("prompt_seconds_total", "counter", "Seconds spent on prompts.", [("", float(self.prompt_seconds))])
        metric("decode_seconds_total", "counter", "Seconds spent generating.", [("", float(self.decode_seconds))])
        metric("decode_tokens_per_second", "gauge", "Decode speed of the last reply.", [("", float(self.last_tok_s))])
        metric("time_to_first_token_seconds", "gauge", "Time to first token of the last reply.",
               [("", float(self.last_ttft))])
        if model is not None:
            s = model.store_stats()
            metric("expert_hits_total", "counter", "Expert lookups served from memory.", [("", s["hits"])])
            metric("expert_misses_total", "counter", "Expert lookups that waited for a read.", [("", s["misses"])])
            metric("expert_prefetches_total", "counter", "Expert reads started ahead of use.", [("", s["prefetches"])])
            metric("expert_prefetch_hits_total", "counter", "Prefetched experts used.", [("", s["prefetch_hits"])])
            metric("expert_evictions_total", "counter", "Experts evicted from their slot.", [("", s["evictions"])])
            metric("expert_bytes_read_total", "counter", "Bytes of experts read from the model file after load.",
                   [("", s["bytes_read"])])
            metric("expert_stall_seconds_total", "counter", "Seconds waiting for expert reads.",
                   [("", float(s["stall_seconds"]))])
            plan = model.plan
            metric("memory_budget_bytes", "gauge", "The memory budget the model plans within.",
                   [("", plan.budget if plan is not None else 0)])
            batcher = model.batcher  # parallel slots: one KV cache each
            caches = [model.transformer.cache] if batcher is None else [t.cache for t in batcher.members]
            metric("kv_cache_bytes", "gauge", "The KV caches' size.", [("", sum(c.nbytes for c in caches))])
            if batcher is not None:
                metric("decode_batches_total", "counter", "Decoding steps of the parallel slots, by the number of "
                       "tokens run as one batch.", [(f'{{size="{k}"}}', n) for k, n in sorted(batcher.batches.items())])
        metric("resident_memory_bytes", "gauge", "The process's resident set size.",
               [("", self._process.memory_info().rss)])
        metric("peak_resident_memory_bytes", "gauge", "The process's peak resident set size.", [("", _peak_rss())])
        metric("resident_memory_before_load_bytes", "gauge", "The resident set size before the model loaded (the "
               "interpreter and the server; the memory budget counts what comes after).", [("", rss_before_load)])
        return "\n".join(out) + "\n"
