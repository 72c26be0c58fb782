"""`offload.Model`: load a GGUF MoE model, tokenize, get logits, generate text."""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import arch
from .cache_types import DEFAULT_CACHE_TYPE, check_cache_types, flash_attention_wanted
from .errors import ContextOverflowError, ModelBusyError, OffloadError
from .forward import Transformer
from .kv_shift import check_can_shift
from .gguf_file import GGUFFile
from .store import (MemoryPlan, StoreStats, TieredExperts, check_within_limit, default_budget, make_plan, memory_cap,
                    parse_budget)
from .store.loader import supports_o_direct
from .store.plan import context_error, default_context
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights import ResidentExperts, in_anonymous_memory, load_weights

CACHE_POLICIES = ("lrfu", "lru", "lfu")
IO_THREADS = 4  # expert reads in flight at once (loader threads)
DEFAULT_PREFETCH_DEPTH = 1  # MoE layers ahead whose experts are predicted and read (offload.predict)

DEFAULT_N_CTX = 4096


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "length", "context"; chat also "stop" (a stop string), "interrupted"
    cached_tokens: int = 0  # chat: prompt tokens found in the KV cache (not run again)
    context_shifts: int = 0  # times the full context was shifted (Model.context_shift)
    time_to_first_token: float = 0.0  # chat: seconds from the request to the first text

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


class _OneThreadAtATime:
    """A Model holds one KV cache and one set of scratch buffers, so two threads computing
    with it at once would corrupt each other's results silently. Calls (a generation lasts
    from its first token to its end or close) may nest in one thread; a call from another
    thread while one runs raises ModelBusyError. A server queues requests before this."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me) and self._owner in _live_threads():
                raise ModelBusyError("this Model is in use by another thread (calls on one Model must not overlap: "
                                     "queue them, or load one Model per thread)")
            self._depth = self._depth + 1 if self._owner == me else 1
            self._owner = me

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth <= 0:
                self._owner, self._depth = None, 0


def _live_threads() -> set[int]:
    return {t.ident for t in threading.enumerate()}


@dataclass
class Model:
    """A loaded model. Build it with `Model.load(path)`."""

    path: str
    gguf: GGUFFile
    args: arch.ModelArgs
    transformer: Transformer
    tokenizer: Tokenizer
    n_ctx: int
    last_generation: GenerationStats = field(default_factory=GenerationStats)
    plan: MemoryPlan | None = None  # how the memory budget is spent
    experts: object = None  # the ExpertStore: TieredExperts, or ResidentExperts (the file's memory map)
    _store_at_start: dict = field(default_factory=dict)
    last_trace: object = None  # the RoutingTrace of the last generate(record_trace=...)
    chat_template_source: str | None = None  # Jinja text that overrides the model's chat template
    _kv_ids: list = field(default_factory=list)  # the token ids in the KV cache (chat reuses them)
    loaded_state_extra: dict = field(default_factory=dict)  # what the last load_state's file kept beside the cache
    _chat_template: object = None
    _busy: _OneThreadAtATime = field(default_factory=_OneThreadAtATime)
    context_shift: bool = False  # shift a full context instead of stopping (llama.cpp's --context-shift)
    n_keep: int | None = None  # tokens a shift keeps (llama.cpp's --keep; see shift_context)
    context_note: str = ""  # how n_ctx was chosen when not given (the CLI prints it)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, n_ctx: int | None = None, n_threads: int | None = None,
             memory_budget: str | int | None = None, cache_policy: str = "lrfu", cache_scope: str = "global",
             o_direct: bool | None = None, prefetch_slots: int | None = None, io_threads: int = IO_THREADS,
             prefetch: bool | str = True, prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
             predictor: str = "lookahead", chat_template: str | None = None,
             vram_budget: str | int | None = None, gpu_options: dict | None = None,
             cache_type_k: str = DEFAULT_CACHE_TYPE, cache_type_v: str = DEFAULT_CACHE_TYPE,
             context_shift: bool = False, n_keep: int | None = None, n_ubatch: int | None = None,
             flash_attn: str | bool = "auto") -> "Model":
        """Open `path`; `n_ctx` defaults to the training context, or the longest that fits the
        memory budget beside the minimum expert slots (`context_note` says which; a context
        given that does not fit is refused naming the longest that does); `n_threads`: all cores.

        `memory_budget` ("6GB", "6GiB", "512MB", "60%" of RAM, or bytes) caps what the model
        keeps resident: weights, expert slots, KV cache, scratch. Experts that do not fit are
        read from the file when needed (`cache_policy`: lrfu, lru or lfu; `cache_scope`:
        "global" or "layer" capacity; `o_direct` reads around the page cache, by default where
        the process runs under a memory limit (a cgroup's: the page cache would be charged to
        the same limit as the budget and thrash) and the budget does not hold every expert). A budget below
        the minimum raises BudgetError; one that holds the whole model loads every expert
        and does no I/O afterwards. `io_threads`: expert reads in flight at once. With a
        tiered store and `prefetch`, a predictor (`predictor`: lookahead, transition or
        combined; see offload.predict) guesses the experts of the next `prefetch_depth` MoE
        layers after each layer's attention, and the store reads them while the layer
        computes (results never change; only when the reads happen). `prefetch` True:
        decoding tokens prefetch while that measures faster than not (offload.prefetch_gate);
        "always": every token does; False: none. Without a
        budget: 75% of the available RAM, and a model that fits it runs from the file's
        memory map as before. `chat_template`: Jinja text to use instead of the model's own
        chat template (for `chat` and `create_chat_completion`).

        `vram_budget` ("auto": 90% of free GPU memory, "50%" of it, or a size) adds the device
        tier on a CUDA GPU (offload.gpu): the always-needed matrices and a slot arena of hot
        experts in VRAM, the rest computed on the CPU or copied over, as a cost model measured
        at start says. `gpu_options`: keywords for offload.gpu.attach (calibration: a
        Calibration to use instead of measuring; output: False keeps the output matrix off
        the device). Given without a GPU, it raises OffloadError (OFFLOAD_GPU_SIMULATOR=1:
        Numba's CUDA simulator). None (default): "auto" (or $OFFLOAD_VRAM_BUDGET) when an
        NVIDIA driver is loaded, with a warning and the CPU if the GPU cannot be used; without
        one no GPU code is loaded. "off" (or 0): the CPU only.

        `cache_type_k` / `cache_type_v`: the KV cache's types (offload.cache_types: f32, f16,
        bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl; a quantized V needs flash attention, as llama.cpp's).
        `flash_attn`: "on", "off" or "auto" (llama.cpp's -fa; auto: on for a quantized V cache
        only): attention as llama.cpp's flash attention computes it (kernels.attention.flash_attention).

        `context_shift`: when a generation or a chat reply fills the context, shift it as
        llama.cpp's --context-shift does (`shift_context`) instead of stopping; `n_keep`: the
        tokens a shift keeps at the start (llama.cpp's --keep; None: the BOS token, and in a
        chat the system prompt; -1: the whole prompt).

        `n_ubatch`: the most tokens run at once (llama.cpp's n_ubatch; logits equal llama.cpp's
        run with the same). None: 512, or less only where a budget is below 512's minimum
        (store.plan; the plan shows what a smaller one buys in expert slots)."""
        gguf = GGUFFile(path)
        try:
            args = arch.model_args(gguf)
            if n_threads is not None:
                set_threads(n_threads)
            if cache_policy.lower() not in CACHE_POLICIES:
                raise OffloadError(f"cache policy {cache_policy!r} is not one of {', '.join(CACHE_POLICIES)}")
            if memory_budget is None:
                budget, source = default_budget()
            else:
                budget, source = parse_budget(memory_budget), "given"
                check_within_limit(budget)
            flash = flash_attention_wanted(flash_attn, cache_type_v)
            check_cache_types(cache_type_k, cache_type_v, args.attention, args.head_dim, flash)
            if context_shift:
                check_can_shift(args, cache_type_k)

            def options(direct: bool) -> dict:
                return dict(o_direct=direct, scope=cache_scope, prefetch_slots=prefetch_slots,
                            gpu=_gpu_wanted(vram_budget), type_k=cache_type_k, type_v=cache_type_v, n_ubatch=n_ubatch)

            cap = memory_cap() if o_direct is None else None
            direct = bool(o_direct) or (cap is not None and supports_o_direct(path))
            context_note = ""
            if n_ctx is None or n_ctx <= 0:
                n_ctx, context_note = default_context(gguf, args, budget, **options(direct))
            plan = make_plan(gguf, args, n_ctx, budget, source, **options(direct))
            if o_direct is None and plan.o_direct:
                if plan.all_resident:  # read once at load: the page cache does no harm
                    plan = make_plan(gguf, args, n_ctx, budget, source, **options(False))
                else:
                    plan.o_direct_reason = f"memory limit in {cap}"
            o_direct = plan.o_direct
            too_long = context_error(gguf, args, n_ctx, plan, **options(o_direct))
            if too_long is not None:
                raise too_long
            plan.check()
            weights = load_weights(gguf, args)
            if plan.pools and not plan.all_resident and memory_cap() is not None:
                weights = in_anonymous_memory(weights)  # file pages would be evicted as the slots fill the cap
            if not plan.pools or (memory_budget is None and plan.all_resident and not o_direct):
                experts = ResidentExperts(gguf, args)
            else:
                experts = TieredExperts(gguf, plan, args, policy=cache_policy, io_threads=io_threads)
            transformer = Transformer(args, weights, experts, n_ctx, cache_type_k, cache_type_v, plan.n_ubatch, flash)
            transformer.file_check = gguf.check_unchanged
            _attach_gpu(transformer, weights, experts, gguf, args, vram_budget, gpu_options)
            if prefetch not in (True, False, "always"):
                raise OffloadError(f"prefetch={prefetch!r}: True (while it pays), 'always' or False")
            if prefetch and prefetch_depth > 0 and isinstance(experts, TieredExperts) and not experts.all_resident:
                from .predict import Prefetcher, make_predictor

                # the GPU tier, when there is one, passes predictions on and stages them in VRAM
                transformer.prefetcher = Prefetcher(make_predictor(predictor, weights, args, prefetch_depth),
                                                    transformer.experts, adaptive=prefetch is True)
                experts.set_prefetch_depth(prefetch_depth)
            try:
                tokenizer = Tokenizer(path, gguf)
            except BaseException:
                if transformer.gpu is not None:
                    transformer.gpu.close()
                if isinstance(experts, TieredExperts):
                    experts.close()
                raise
        except BaseException:
            gguf.close()
            raise
        return cls(str(path), gguf, args, transformer, tokenizer, n_ctx, plan=plan, experts=experts,
                   chat_template_source=chat_template, context_shift=context_shift, n_keep=n_keep,
                   context_note=context_note)

    # -- text <-> tokens ---------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids; with `add_bos`, BOS is added when the model's metadata asks for it."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- compute -------------------------------------------------------------------------
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) float32 of every position, in a fresh context."""
        ids = self._check_tokens(tokens)
        with self._busy:
            self.transformer.reset()
            self._kv_ids = []
            return self.transformer.forward(ids, all_logits=True)

    def generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        record_trace: str | os.PathLike[str] | None = None,
        stream: bool = True,
        reuse_cache: bool = False,
        repeat_last_n: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> Iterator[str] | str:
        """Stream the continuation of `prompt` as text pieces (whole UTF-8 characters);
        `stream=False`: return it as one string. The sampling arguments are llama.cpp's
        (offload.sampling).
        `record_trace`: save the run's routing trace there; `reuse_cache`: do not run again
        the prompt's start the KV cache holds (see `generate_tokens`)."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed,
                                presence_penalty, frequency_penalty)
        pieces = self._generate(prompt, max_tokens, params, record_trace, reuse_cache)
        return pieces if stream else "".join(pieces)

    def _generate(self, prompt, max_tokens, params: SamplingParams, record_trace, reuse_cache=False) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_tokens(prompt, max_tokens, params, record_trace=record_trace,
                                          reuse_cache=reuse_cache):
            text = decoder.push(token)
            if text:
                yield text
        tail = decoder.flush()
        if tail:
            yield tail

    def generate_tokens(self, prompt: str | list[int], max_tokens: int, params: SamplingParams,
                        record_trace: str | os.PathLike[str] | None = None,
                        reuse_cache: bool = False) -> Iterator[int]:
        """Token ids of the continuation; stops at end-of-generation, max_tokens or a full context.

        `record_trace`: a path; every MoE layer's routing of every token run is recorded and
        saved there as a `.npz` routing trace (`offload.trace`) when the generation ends (or
        is closed early); also kept as `self.last_trace`. `reuse_cache`: the tokens the KV
        cache already holds (a previous generation, or `load_state`) that begin the prompt
        are not run again, as llama.cpp's prompt cache (the last prompt token always runs, for
        its logits; a batch split so may round a last bit differently than one batch)."""
        with self._busy:
            if record_trace is not None:
                ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
                yield from self._recording(record_trace, ids, self._generate_tokens(ids, max_tokens, params, reuse_cache))
            else:
                yield from self._generate_tokens(prompt, max_tokens, params, reuse_cache)

    def exclusive(self) -> _OneThreadAtATime:
        """`with model.exclusive():` around work that uses the KV cache (chat turns do)."""
        return self._busy

    def _generate_tokens(self, prompt: str | list[int], max_tokens: int, params: SamplingParams,
                         reuse_cache: bool) -> Iterator[int]:
        ids = self._check_tokens(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        stats = self.last_generation = GenerationStats(prompt_tokens=len(ids))
        sampler = Sampler(params)
        for t in ids:
            sampler.accept(t)
        reused = self._reusable_prefix(ids) if reuse_cache else 0
        if reused:
            self.transformer.cache.n_past = reused
            del self._kv_ids[reused:]
        else:
            self.transformer.reset()
            self._kv_ids = []
        stats.cached_tokens = reused
        self._store_at_start = self.store_stats()
        t0 = time.perf_counter()
        logits = self.transformer.forward(ids[reused:])[-1]
        self._kv_ids.extend(int(t) for t in ids[reused:])  # what the cache holds, for save_state
        stats.prompt_seconds = time.perf_counter() - t0
        stats.stop_reason = "length"
        t0 = time.perf_counter()
        keep = self._keep(ids)
        for i in range(max_tokens):
            token = sampler.sample(logits)
            if self.tokenizer.is_end_of_generation(token):
                stats.stop_reason = "eos"
                break
            sampler.accept(token)
            stats.generated_tokens += 1
            yield token
            if i + 1 == max_tokens:
                break
            if not self._room_for_one(keep):
                stats.stop_reason = "context"
                break
            logits = self.transformer.forward(np.array([token]))[-1]
            self._kv_ids.append(int(token))
        stats.generate_seconds = time.perf_counter() - t0

    def _keep(self, prompt: list[int], default: int | None = None) -> int:
        """How many tokens a context shift keeps, for this prompt: llama.cpp's n_keep (`self.n_keep`,
        0 if None; -1 or more than the prompt: all of it) plus the BOS token, as llama-completion
        counts it; or, with `self.n_keep` None, `default` tokens (a chat's system prompt) if given."""
        if self.n_keep is None and default is not None:
            return min(default, len(prompt))
        n_keep = self.n_keep or 0
        if n_keep < 0 or n_keep > len(prompt):
            return len(prompt)
        return n_keep + int(len(prompt) > 0 and prompt[0] == self.tokenizer.bos_id >= 0)

    def _room_for_one(self, keep) -> bool:
        """Whether one more token fits: a full context is shifted first where context_shift is
        on (as llama.cpp does, once a token would take its last cell), keeping `keep` tokens (or
        keep() of them); False if it cannot be."""
        if not self.context_shift:
            return self.transformer.cache.n_past < self.n_ctx
        if self.transformer.cache.n_past + 1 < self.n_ctx:
            return True
        return self.shift_context(keep() if callable(keep) else keep) > 0

    def shift_context(self, n_keep: int, n_discard: int | None = None) -> int:
        """llama.cpp's context shift: keep the first n_keep tokens of the KV cache (at most
        n_ctx - 4), drop the next n_discard (default: half of the rest, as llama-server), move
        the later ones down and rotate their cached keys instead of running them again
        (Transformer.shift_context). Returns the tokens dropped."""
        cache = self.transformer.cache
        kv = self._kv_sync()
        n_keep = max(0, min(n_keep, self.n_ctx - 4))
        n_left = cache.n_past - n_keep
        n_discard = n_left // 2 if n_discard is None else n_discard
        n_discard = min(max(n_discard, 0), max(0, n_left - 1))
        if n_discard:
            self.transformer.shift_context(n_keep, n_discard)
            del kv[n_keep:n_keep + n_discard]
            self.last_generation.context_shifts += 1
        return n_discard

    def _reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of ids the KV cache holds already and can keep: not all of
        them (the last runs for its logits), and none once a sliding window's ring has
        overwritten cells a shorter cache would need."""
        from .chat import common_prefix

        kv, cache = self._kv_sync(), self.transformer.cache
        n = min(common_prefix(kv, list(ids)), len(ids) - 1)
        if not cache.can_truncate(n):
            return 0
        return max(n, 0)

    # -- saved sessions --------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike[str], extra: dict | None = None) -> None:
        """Write the KV cache and the tokens it holds to `path` (atomically: a temporary file
        renamed over it), with the model's identity and cache types (offload.session);
        `extra`: JSON-able facts to keep beside them."""
        from .session import save_state

        with self._busy:
            save_state(self, path, list(self._kv_sync()), extra)

    def load_state(self, path: str | os.PathLike[str]) -> list[int]:
        """Restore a state written by save_state for this model file and cache types (else a
        one-line StateError); returns the tokens the cache now holds. Continue with
        generate_tokens(those tokens + more, reuse_cache=True), or chat."""
        from .session import load_state

        with self._busy:
            self.transformer.reset()
            self._kv_ids = []
            tokens, self.loaded_state_extra = load_state(self, path)
            self._kv_ids = list(tokens)
            return list(tokens)

    # -- chat ----------------------------------------------------------------------------
    @property
    def chat_template(self):
        """The ChatTemplate `chat` renders with: the model's own, or `Model.load(chat_template=...)`."""
        if self._chat_template is None:
            from .chat_template import ChatTemplate

            if self.chat_template_source is not None:
                bos = self.tokenizer.piece(self.tokenizer.bos_id, special=True).decode("utf-8", "replace") \
                    if self.tokenizer.bos_id >= 0 else ""
                eos = self.tokenizer.piece(self.tokenizer.eos_id, special=True).decode("utf-8", "replace") \
                    if self.tokenizer.eos_id >= 0 else ""
                self._chat_template = ChatTemplate.from_string(self.chat_template_source, bos_token=bos, eos_token=eos)
            else:
                self._chat_template = ChatTemplate.for_model(self.gguf, self.tokenizer)
        return self._chat_template

    def chat(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = True,
        tools: list[dict] | None = None,
        reasoning_effort: str | None = None,
    ) -> Iterator[str] | str:
        """The assistant's reply to `messages` (OpenAI-style dicts: role, content), rendered with
        the model's chat template: an iterator of text pieces, or with `stream=False` one string.

        The KV cache is kept between calls: a conversation that grows by a message prefills only
        what is new (the longest common prefix with the cached tokens is not run again).
        `max_tokens` None: until the end of the turn or a full context. `tools` (OpenAI
        function specs) and `reasoning_effort` ("low", "medium", "high": gpt-oss) go to the
        template. The text is the answer only: a reasoning model's reasoning and tool calls
        come with `create_chat_completion` (`reasoning_content`, `tool_calls`)."""
        from .chat import CONTENT, run_chat

        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        deltas = run_chat(self, self.chat_template, list(messages), params, max_tokens, stops,
                          template_vars=_template_vars(tools, reasoning_effort))

        def pieces():
            try:
                for d in deltas:
                    if d.kind == CONTENT:
                        yield d.text
            finally:
                deltas.close()  # a caller that stops early stops the generation (and its stats) now

        return pieces() if stream else "".join(pieces())

    def create_chat_completion(
        self,
        messages: list[dict],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stream: bool = False,
        model: str | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        tools: list[dict] | None = None,
        reasoning_effort: str | None = None,
    ):
        """An OpenAI chat completion, shaped as llama-cpp-python's `Llama.create_chat_completion`
        returns it (same defaults): a dict (object "chat.completion": choices[0].message,
        finish_reason "stop", "tool_calls" or "length", usage), or with `stream=True` an
        iterator of "chat.completion.chunk" dicts: delta {"role"} first, then {"content"}
        pieces, then {} with the finish_reason. Keeps the KV cache between calls, as `chat` does.

        A model that writes OpenAI's harmony format (gpt-oss) gets its reply split as llama.cpp's
        server splits it: the analysis channel in `message.reasoning_content` (streamed as
        `delta.reasoning_content`), the final channel in `content`, a call to a function in
        `tool_calls` (finish_reason "tool_calls"). `tools` (OpenAI function specs) and
        `reasoning_effort` ("low", "medium", "high") go to the template; assistant messages sent
        back may carry `reasoning_content` and `tool_calls` (arguments as a JSON string)."""
        from .chat import TurnResult, chunk_dict, completion_dict, completion_id, delta_dict, run_chat

        if logprobs or top_logprobs:
            raise OffloadError("logprobs are not supported")
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        cid, created, name = completion_id(), int(time.time()), model if model is not None else self.path
        res = TurnResult()
        deltas = run_chat(self, self.chat_template, list(messages), params, max_tokens, stops, result=res,
                          template_vars=_template_vars(tools, reasoning_effort))
        if not stream:
            for _ in deltas:
                pass
            return completion_dict(cid, created, name, res)

        def chunks():
            first = True
            try:
                for d in deltas:
                    if first:
                        yield chunk_dict(cid, created, name, {"role": "assistant"})
                        first = False
                    delta = delta_dict(d, res)
                    if delta:
                        yield chunk_dict(cid, created, name, delta)
            finally:
                deltas.close()
            if first:
                yield chunk_dict(cid, created, name, {"role": "assistant"})
            yield chunk_dict(cid, created, name, {}, res.finish_reason)

        return chunks()

    def _kv_sync(self) -> list[int]:
        """The ids in the KV cache, made consistent with cache.n_past after an interruption."""
        kv, cache = self._kv_ids, self.transformer.cache
        n = min(len(kv), cache.n_past)
        del kv[n:]
        cache.n_past = n
        return kv

    def _begin_generation(self, prompt_tokens: int) -> GenerationStats:
        self.last_generation = GenerationStats(prompt_tokens=prompt_tokens)
        self._store_at_start = self.store_stats()
        return self.last_generation

    def _recording(self, path, ids: list[int], tokens: Iterator[int]) -> Iterator[int]:
        from .trace import TraceRecorder

        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise OffloadError(f"cannot write the routing trace to {path}: no writable folder {folder}")
        rec = TraceRecorder(self.args.n_expert, self.args.n_expert_used, position=lambda: self.transformer.cache.n_past,
                            model=os.path.basename(self.path),
                            meta={"cache_policy": getattr(self.experts, "policy", "resident"),
                                  "memory_budget": self.plan.budget if self.plan else 0})
        rec.add_tokens(ids, prompt=True)
        self.transformer.recorder = rec
        try:
            for token in tokens:
                rec.add_tokens([token])
                yield token
        finally:
            self.transformer.recorder = None
            self.last_trace = trace = rec.finish()
            if trace.n_steps or sys.exc_info()[0] in (None, GeneratorExit):  # not for a prompt refused up front
                try:
                    trace.save(path)
                except OSError as e:
                    raise OffloadError(f"cannot write the routing trace to {path}: {e.strerror or e}") from None

    def store_stats(self) -> dict:
        """The expert store's counters since load (hits, misses, bytes read, stall seconds...)."""
        s = self.experts.stats.as_dict() if isinstance(self.experts, TieredExperts) else StoreStats().as_dict()
        return s

    def stats(self) -> dict:
        """Counters of the last generation and of the expert store.

        Store counters are totals since load; `*_last` ones cover the last `generate`, and
        `bytes_read_per_token` divides its bytes read by its tokens (prompt + generated)."""
        g = self.last_generation
        store = self.store_stats()
        start = self._store_at_start or store
        tokens = g.prompt_tokens + g.generated_tokens
        out = {
            "prompt_tokens": g.prompt_tokens,
            "prompt_tok_s": g.prompt_tok_s,
            "generated_tokens": g.generated_tokens,
            "decode_tok_s": g.decode_tok_s,
            "stop_reason": g.stop_reason,
            "kv_cache_bytes": self.transformer.cache.nbytes,
        }
        out.update(store)
        for k in ("hits", "misses", "bytes_read", "stall_seconds"):
            out[k + "_last"] = store[k] - start.get(k, 0)
        out["bytes_read_per_token"] = out["bytes_read_last"] / tokens if tokens else 0.0
        out["hit_rate"] = store["hits"] / (store["hits"] + store["misses"]) if store["hits"] + store["misses"] else 1.0
        out["memory_budget"] = self.plan.budget if self.plan else 0
        out["planned_bytes"] = self.plan.planned if self.plan else 0
        out["expert_slots"] = self.plan.slots if self.plan and isinstance(self.experts, TieredExperts) else 0
        out["resident_experts"] = (self.experts.resident_experts() if isinstance(self.experts, TieredExperts)
                                   else self.plan.n_experts if self.plan else 0)
        out["cache_policy"] = self.experts.policy if isinstance(self.experts, TieredExperts) else "resident"
        out["resident_bytes"] = _rss()
        out["peak_rss_bytes"] = _peak_rss()
        gpu = self.transformer.gpu
        if gpu is not None:  # the device tier: where experts ran, what moved to VRAM
            out["gpu"] = dict(gpu.stats.as_dict(), device=gpu.device.name, vram_budget=gpu.plan.budget,
                              vram_used=gpu.plan.used, vram_expert_slots=gpu.plan.n_slots)
        prefetcher = getattr(self.transformer, "prefetcher", None)
        out["prefetch_depth"] = prefetcher.depth if prefetcher is not None else 0
        if prefetcher is not None:  # recall / precision per distance, and per layer with its I/O stall
            out.update(prefetcher.stats())
        return out

    def _check_tokens(self, tokens: list[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise OffloadError("need at least one token")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens, more than the context of {self.n_ctx} (raise -c / n_ctx)")
        bad = ids[(ids < 0) | (ids >= self.args.n_vocab)]
        if len(bad):
            raise OffloadError(f"token id {int(bad[0])} is outside the vocabulary of {self.args.n_vocab}")
        return ids

    # -- parallel sequences ----------------------------------------------------------------
    def parallel_slots(self, n: int, batch: bool = True) -> list["Model"]:
        """n sequences on this model's weights, as llama-server's parallel slots (-np): the
        context split evenly (n_ctx // n each: the same KV memory as one), each slot a Model
        of its own (its KV cache, token history and statistics) whose steps run on the thread
        that calls `slots[0].batcher.run()`, decoding tokens of several slots as one batch
        (offload.batching; batch=False: one after the other). This model becomes the first
        slot; the others share its weights and must not be closed."""
        from .batching import Batcher

        if n < 1:
            raise OffloadError(f"parallel slots must be 1 or more, got {n}")
        if self.transformer.gpu is not None and n > 1:
            raise OffloadError("parallel slots run on the CPU tiers only; drop --vram-budget or use -np 1")
        per_slot = self.n_ctx // n
        if per_slot < 16:
            raise OffloadError(f"a context of {self.n_ctx} split over {n} slots leaves {per_slot} tokens each; "
                               "raise -c or lower -np")
        self.transformer.resize_context(per_slot)
        self.n_ctx, self._kv_ids = per_slot, []
        slots = [self]
        for _ in range(n - 1):
            other = copy.copy(self)
            other.transformer = self.transformer.fork(per_slot)
            other._kv_ids, other.last_generation, other._busy = [], GenerationStats(), _OneThreadAtATime()
            other._store_at_start, other.last_trace = {}, None
            slots.append(other)
        batcher = Batcher([slot.transformer for slot in slots], batch=batch)
        for slot in slots:
            slot.transformer.batcher = batcher
        return slots

    @property
    def batcher(self):
        """The offload.batching.Batcher that runs this slot's steps (parallel_slots), or None."""
        return self.transformer.batcher

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self.transformer.gpu is not None:
            self.transformer.gpu.close()
            self.transformer.gpu = None
        if isinstance(self.experts, TieredExperts):
            self.experts.close()
        self.tokenizer.close()
        self.gguf.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _template_vars(tools, reasoning_effort) -> dict:
    """The chat API's keywords that become template variables (only those given)."""
    from .harmony import check_reasoning_effort

    out: dict = {}
    if tools is not None:
        out["tools"] = tools
    if check_reasoning_effort(reasoning_effort) is not None:
        out["reasoning_effort"] = reasoning_effort
    return out


def _gpu_wanted(vram_budget) -> bool:
    """Whether the GPU tier will be tried: asked for, or by default with an NVIDIA GPU present
    (and $OFFLOAD_VRAM_BUDGET not "off")."""
    from . import gpu

    if vram_budget is None:
        return os.environ.get(gpu.DEFAULT_ENV, "auto").strip().lower() not in gpu.OFF and gpu.gpu_present()
    return str(vram_budget).strip().lower() not in gpu.OFF


def _attach_gpu(transformer, weights, experts, gguf, args, vram_budget, gpu_options) -> None:
    """The GPU tier: as asked (`vram_budget` a size or share), or by default ("auto", or
    $OFFLOAD_VRAM_BUDGET) when an NVIDIA GPU is present, falling back to the CPU with a
    warning if it cannot be used."""
    from . import gpu

    if not _gpu_wanted(vram_budget):
        return
    implicit = vram_budget is None
    if implicit:
        vram_budget = os.environ.get(gpu.DEFAULT_ENV, "auto")
    from .weights import expert_layouts

    try:
        gpu.attach(transformer, weights, experts, expert_layouts(gguf, args), args.n_expert_used, vram_budget,
                   **(gpu_options or {}))
    except OffloadError as e:
        if not implicit:
            raise
        warnings.warn(f"the GPU is not used ({e}); running on the CPU (--vram-budget off: do not try)",
                      RuntimeWarning, stacklevel=3)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def set_threads(n: int) -> None:
    """Threads for every kernel, Numba's and the C extension's (OpenMP)."""
    from .kernels import cext, jit

    available = jit.max_threads()
    if not 1 <= n <= available:
        raise OffloadError(f"thread count {n} is outside 1..{available}")
    jit.set_num_threads(n)
    cext.set_num_threads(n)
