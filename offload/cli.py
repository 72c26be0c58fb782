"""The `offload` command: inspect a model file, generate text.

Flag names follow llama.cpp's (`-p`, `-n`, `-c`, `-t`, `--temp`, ...) where the concept
is the same. A problem with the user's input ends the command with one line on stderr
and exit code 1 (a malformed command line: exit code 2); Ctrl-C ends it with 130.
"""

from __future__ import annotations

import os
import sys

import click

from .cache_types import DEFAULT_CACHE_TYPE
from .errors import OffloadError


class _Group(click.Group):
    """Turns OffloadError, and a command's usage error, into one line on stderr instead of a
    traceback or click's usage block."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"offload: error: {e.format_message()} ('{where} -h' for help)", err=True)
            sys.exit(e.exit_code)
        except OffloadError as e:
            click.echo(f"offload: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offload", prog_name="offload")
def main() -> None:
    """Run Mixture-of-Experts GGUF models on a machine with less memory than the model."""


model_argument = click.argument("model", required=False, type=click.Path(dir_okay=True))


def _model_path(model: str | None) -> str:
    if model:
        return model
    from .demo import demo_model_path

    return str(demo_model_path())


def _cache_type_options(f):
    """-ctk / -ctv, as llama.cpp's: the KV cache's types for keys and values; and -fa."""
    from .cache_types import CACHE_TYPES, DEFAULT_CACHE_TYPE, FLASH_ATTN_MODES

    f = click.option("-fa", "--flash-attn", "flash_attn", type=click.Choice(FLASH_ATTN_MODES, case_sensitive=False),
                     default="auto", show_default=True,
                     help="Flash attention, as llama.cpp's (auto: on for a quantized V cache, which needs it).")(f)
    for flag, short, what in (("--cache-type-v", "-ctv", "values (quantized: with flash attention)"),
                              ("--cache-type-k", "-ctk", "keys")):
        f = click.option(short, flag, type=click.Choice(list(CACHE_TYPES), case_sensitive=False),
                         default=DEFAULT_CACHE_TYPE, show_default=True, help=f"KV cache type of the {what}.")(f)
    return f


@main.command()
@model_argument
@click.option("-c", "--ctx-size", type=int, default=0, help="Context size to plan for (0: min(trained, 4096)).")
@_cache_type_options
@click.option("--memory-budget", default=None, help="Print the memory plan for this budget (6GB, 6GiB, 512MB, 60%).")
@click.option("--cache-scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Expert slots shared by all layers, or a quota per layer.")
@click.option("--o-direct", is_flag=True, help="Plan slots for O_DIRECT reads.")
@click.option("-ub", "--ubatch-size", type=click.IntRange(1, None), default=None,
              help="Most tokens run at once (llama.cpp's n_ubatch; default 512, or less where the memory budget "
                   "is below 512's minimum). Smaller: more expert slots, slower prompts (inspect shows the trade).")
@click.option("--disk-bandwidth", default="3GB", show_default=True,
              help="Read bandwidth per second of the disk holding the model (e.g. 3GB, 500MB), for the decode bound.")
def inspect(model: str | None, ctx_size: int, memory_budget: str | None, cache_scope: str, o_direct: bool,
            disk_bandwidth: str, cache_type_k: str = DEFAULT_CACHE_TYPE,
            cache_type_v: str = DEFAULT_CACHE_TYPE, ubatch_size: int | None = None, flash_attn: str = "auto") -> None:
    """What is in MODEL and what it needs to run."""
    from . import arch
    from .gguf_file import GGUFFile
    from .model import DEFAULT_N_CTX
    from .summary import format_summary, summarize
    from .weights import unsupported_tensor

    path = _model_path(model)
    gguf = GGUFFile(path)
    args = arch.model_args(gguf)
    from .store import parse_budget
    from .store.plan import context_error, default_context

    budget = parse_budget(memory_budget) if memory_budget is not None else None
    from .cache_types import check_cache_types, flash_attention_wanted

    check_cache_types(cache_type_k, cache_type_v, args.attention, args.head_dim,
                      flash_attention_wanted(flash_attn, cache_type_v))
    options = dict(scope=cache_scope, o_direct=o_direct, type_k=cache_type_k, type_v=cache_type_v, n_ubatch=ubatch_size)
    note = ""
    if ctx_size > 0:
        n_ctx = ctx_size
    elif budget is not None:  # as Model.load chooses it for this budget
        n_ctx, note = default_context(gguf, args, budget, **options)
    else:
        n_ctx = min(args.n_ctx_train, DEFAULT_N_CTX)
    summary = summarize(gguf, args, n_ctx, budget, **options)
    if budget is not None and ctx_size > 0:
        too_long = context_error(gguf, args, n_ctx, summary.plan, **options)
        note = str(too_long) if too_long is not None else ""
    try:
        summary.plan.disk_bandwidth = parse_budget(disk_bandwidth.removesuffix("/s")) if "%" not in disk_bandwidth else 0
    except OffloadError:
        summary.plan.disk_bandwidth = 0
    if not summary.plan.disk_bandwidth:
        raise click.BadParameter(f"{disk_bandwidth!r} is not a size per second (examples: 3GB, 500MB)",
                                 param_hint="--disk-bandwidth")
    click.echo(format_summary(path, summary))
    if note:
        click.echo(note)
    problem = unsupported_tensor(gguf)
    click.echo(f"runs in offload   {'no: ' + problem if problem else 'yes'}")


@main.command()
@model_argument
@click.option("-p", "--prompt", default="Once upon a time", show_default=True, help="Text to continue.")
@click.option("-n", "--n-predict", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", default=0.8, show_default=True, help="Temperature; 0 is greedy.")
@click.option("--top-k", default=40, show_default=True, help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", default=0.95, show_default=True, help="Keep the smallest set with this much probability (1: off).")
@click.option("--min-p", default=0.05, show_default=True, help="Drop tokens below this share of the best one's probability (0: off).")
@click.option("--repeat-penalty", default=1.0, show_default=True,
              help="Divide the logits of tokens among the last --repeat-last-n by this (1: off).")
@click.option("--repeat-last-n", default=64, show_default=True, type=click.IntRange(0, None),
              help="Tokens the penalties look back over (0: none).")
@click.option("--presence-penalty", default=0.0, show_default=True,
              help="Lower the logit of every token among the last --repeat-last-n by this (0: off).")
@click.option("--frequency-penalty", default=0.0, show_default=True,
              help="Lower a token's logit by this times its count among the last --repeat-last-n (0: off).")
@click.option("--seed", type=int, default=None, help="Random seed (default: random).")
@click.option("-c", "--ctx-size", type=int, default=0, help="Context size (0: min(trained, 4096)).")
@_cache_type_options
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: all cores).")
@click.option("--memory-budget", default=None,
              help="Cap on what the model keeps in RAM: 6GB, 6GiB, 512MB, 60% (default: 75% of available RAM).")
@click.option("--cache-policy", type=click.Choice(["lrfu", "lru", "lfu"]), default="lrfu", show_default=True,
              help="Which cached expert to evict: frequency+recency, least recently or least frequently used.")
@click.option("--cache-scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Expert slots shared by all layers, or a quota per layer.")
@click.option("--o-direct/--no-o-direct", default=None,
              help="Read experts with O_DIRECT, around the page cache (default: on when the process runs under a "
                   "memory limit, a cgroup's, and the budget does not hold every expert).")
@click.option("-ub", "--ubatch-size", type=click.IntRange(1, None), default=None,
              help="Most tokens run at once (llama.cpp's n_ubatch; default 512, or less where the memory budget "
                   "is below 512's minimum). Smaller: more expert slots, slower prompts (inspect shows the trade).")
@click.option("--prefetch-depth", type=click.IntRange(0, 64), default=None,
              help="MoE layers ahead whose experts are predicted and read while a layer computes [default: 1].")
@click.option("--no-prefetch", is_flag=True,
              help="Do not predict and prefetch the next layers' experts (by default decoding tokens prefetch while "
                   "that measures faster than not).")
@click.option("--vram-budget", default=None,
              help="VRAM for weights and hot experts on a CUDA GPU: auto (90% of free), 50%, 6GB, or off "
                   "(default: auto when an NVIDIA GPU is present; OFFLOAD_GPU_SIMULATOR=1: Numba's CUDA simulator).")
@click.option("--record-trace", "record_trace", type=click.Path(dir_okay=False), default=None,
              help="Save every token's routing (experts and weights per MoE layer) to this .npz file.")
@click.option("--prompt-cache", type=click.Path(dir_okay=False), default=None,
              help="A KV state file: the prompt's start it holds is not run again, and the state is saved there "
                   "after generating (created if missing).")
@click.option("--context-shift", is_flag=True,
              help="When the context is full, drop half of the tokens after --keep and go on (llama.cpp's "
                   "context shift: the kept keys are rotated, not run again).")
@click.option("--keep", "n_keep", type=int, default=None,
              help="Prompt tokens a context shift keeps, after BOS (-1: the whole prompt) [default: 0; chat: the "
                   "system prompt].")
def generate(model, prompt, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, ctx_size, threads,
             memory_budget, cache_policy, cache_scope, o_direct, record_trace=None, prefetch_depth=None,
             no_prefetch=False, vram_budget=None, cache_type_k=DEFAULT_CACHE_TYPE, cache_type_v=DEFAULT_CACHE_TYPE,
             prompt_cache=None, context_shift=False, n_keep=None, repeat_last_n=64, presence_penalty=0.0,
             frequency_penalty=0.0, ubatch_size=None, flash_attn="auto") -> None:
    """Continue PROMPT with MODEL (a GGUF file; default: the demo model)."""
    from .model import DEFAULT_PREFETCH_DEPTH, Model
    from .summary import human_bytes as hb

    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
    with Model.load(_model_path(model), n_ctx=ctx_size, n_threads=threads, memory_budget=memory_budget,
                    cache_policy=cache_policy, cache_scope=cache_scope, o_direct=o_direct,
                    prefetch=not no_prefetch and depth > 0, prefetch_depth=max(depth, 1),
                    vram_budget=vram_budget, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                    context_shift=context_shift, n_keep=n_keep, n_ubatch=ubatch_size, flash_attn=flash_attn) as m:
        _memory_line(m, memory_budget)
        if prompt_cache and os.path.exists(prompt_cache):
            m.load_state(prompt_cache)
        click.echo(prompt, nl=False)
        for piece in m.generate(prompt, max_tokens=n_predict, temperature=temp, top_k=top_k, top_p=top_p,
                                min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, record_trace=record_trace,
                                reuse_cache=bool(prompt_cache), repeat_last_n=repeat_last_n,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty):
            click.echo(piece, nl=False)
        click.echo()
        g = m.last_generation
        if prompt_cache:
            m.save_state(prompt_cache)
            click.echo(f"prompt cache: {g.cached_tokens} prompt tokens reused; {m.transformer.cache.n_past} tokens "
                       f"saved to {prompt_cache}", err=True)
        click.echo(
            f"prompt {g.prompt_tokens} tokens at {g.prompt_tok_s:.1f} tok/s; "
            f"generated {g.generated_tokens} tokens at {g.decode_tok_s:.1f} tok/s (stop: {g.stop_reason})"
            + (f"; context shifted {g.context_shifts} times" if g.context_shifts else ""),
            err=True,
        )
        st = m.stats()
        if st["cache_policy"] != "resident":
            click.echo(
                f"experts: {st['hits_last']} hits, {st['misses_last']} misses, {hb(st['bytes_read_per_token'])} read "
                f"per token, {st['stall_seconds_last']:.2f} s stalled on I/O ({st['cache_policy']}); "
                f"RSS {hb(st['resident_bytes'])} (peak {hb(st['peak_rss_bytes'])})",
                err=True,
            )
            if st.get("prefetch_depth"):
                recall = ", ".join(f"{st[f'prediction_recall_d{d}']:.0%}" for d in range(1, st["prefetch_depth"] + 1)
                                   if f"prediction_recall_d{d}" in st)
                click.echo(f"prefetch: depth {st['prefetch_depth']}, recall by distance {recall or '-'}; "
                           f"{st['prefetch_hits']} prefetched experts used, {st['prefetch_wasted']} wasted "
                           f"({hb(st['prefetch_wasted_bytes'])}), {st['prefetch_cancelled']} reads cancelled, "
                           f"{st['prefetch_skipped_late']} not read (would arrive late); {_gate_line(st)}", err=True)
        if record_trace is not None and m.last_trace is not None:
            t = m.last_trace
            click.echo(f"routing trace: {t.n_steps} tokens x {t.n_layers} MoE layers -> {record_trace}", err=True)


@main.command()
@click.argument("trace_file", metavar="TRACE", type=click.Path(exists=True, dir_okay=False))
@click.option("--capacity", "capacities", multiple=True, default=("10%", "25%", "50%"), show_default=True,
              help="Expert slots (192) or a share of all experts (25%); repeat for several.")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="One pool for every layer, or an even quota per layer.")
@click.option("--policy", "policies", multiple=True, default=("lru", "lfu", "lrfu"), show_default=True,
              help="Policies to replay (repeat for several).")
@click.option("--decode-only", is_flag=True, help="Count only the generated tokens' accesses (the prompt still warms the cache).")
def simulate(trace_file: str, capacities, scope: str, policies, decode_only: bool) -> None:
    """Replay a routing trace (generate --record-trace): hit rates of each policy vs Belady's optimum."""
    from .simulate import compare
    from .trace import RoutingTrace

    t = RoutingTrace.load(trace_file)
    try:
        rows = compare(t, capacities, policies, scope, from_step=t.prompt_tokens if decode_only else 0)
    except ValueError as e:
        raise OffloadError(str(e)) from None
    click.echo(f"{trace_file}: {t.model or '?'}, {t.n_steps} tokens ({t.prompt_tokens} prompt), {t.n_layers} MoE layers "
               f"x {t.n_expert} experts, top-{t.k}; {scope} capacity")
    head = f"{'slots':>7} {'share':>6} " + " ".join(f"{p:>14}" for p in policies) + f" {'belady':>7}"
    click.echo(head)
    for r in rows:
        cells = " ".join(f"{r[p]:>6.1%} ({r[p + '_vs_belady']:>5.1%})" for p in policies)
        click.echo(f"{r['capacity']:>7} {r['share']:>6.1%} {cells} {r['belady']:>7.1%}")
    click.echo("hit rates; in parentheses, as a share of Belady's optimum (evict the expert needed furthest ahead)")


@main.command()
@model_argument
@click.option("--trace", "trace_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Replay this routing trace (generate --record-trace) instead of running the model: hit rates only.")
@click.option("--budgets", default="0,10,25,50,75,100", show_default=True,
              help="Budgets to try, in %% of the way from the minimum to the whole model (trace: %% of all experts).")
@click.option("--cache-policy", "policies", multiple=True, default=("lrfu",), show_default=True,
              type=click.Choice(["lrfu", "lru", "lfu"]), help="Policies to try (repeat for several).")
@click.option("--prefetch-depth", "depths", default="0,1,2", show_default=True,
              help="Prefetch depths to try (0: --no-prefetch).")
@click.option("-n", "--n-predict", default=32, show_default=True, help="Tokens to decode per run.")
@click.option("-p", "--prompt", default="Once upon a time, in a land far away,", show_default=True)
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: all cores).")
@click.option("--no-o-direct", is_flag=True, help="Read experts through the page cache (faster if the model fits in RAM).")
@click.option("--plot", type=click.Path(dir_okay=False), default="offload-tune.png", show_default=True,
              help="Where to draw the curve (PNG, needs matplotlib; \"\" for none).")
@click.option("-c", "--ctx-size", type=int, default=0,
              help="Context to plan the --trace budget for (0: min(trained, 4096), as chat's default).")
@_cache_type_options
def tune(model, trace_file, budgets, policies, depths, n_predict, prompt, threads, no_o_direct, plot,
         cache_type_k=DEFAULT_CACHE_TYPE, cache_type_v=DEFAULT_CACHE_TYPE, ctx_size=0, flash_attn="auto") -> None:
    """Which --memory-budget, --cache-policy and --prefetch-depth to use for MODEL on this machine."""
    from . import tune as t

    try:
        shares = [float(s) / 100 for s in budgets.split(",") if s.strip()]
        depth_list = [int(d) for d in depths.split(",") if d.strip()]
    except ValueError:
        raise OffloadError("--budgets and --prefetch-depth take comma-separated numbers, e.g. 0,25,50") from None
    if not shares or any(not 0 <= s <= 1 for s in shares) or not depth_list or min(depth_list) < 0:
        raise OffloadError("--budgets must lie in 0..100 and --prefetch-depth be 0 or more")
    if trace_file:
        try:
            rows, knee = t.tune_trace(trace_file, shares=shares, policies=policies)
        except ValueError as e:
            raise OffloadError(str(e)) from None
        click.echo(f"{'share':>6} {'slots':>6} " + " ".join(f"{p:>7}" for p in policies) + f" {'belady':>7}  best")
        for r in rows:
            click.echo(f"{r['share']:>6.1%} {r['capacity']:>6} " + " ".join(f"{r[p]:>7.1%}" for p in policies)
                       + f" {r['belady']:>7.1%}  {r['best_policy']}")
        click.echo("\n" + t.ascii_plot([r["share"] * 100 for r in rows], [r["best"] * 100 for r in rows],
                                       x_label="% of experts in slots", y_label="hit rate %"))
        if plot and t.save_plot(plot, [r["share"] * 100 for r in rows], {p: [r[p] for r in rows] for p in policies} |
                       {"belady": [r["belady"] for r in rows]}, knee["share"] * 100 if knee else None,
                       "% of experts in slots", "hit rate"):
            click.echo(f"plot: {plot}")
        if knee:
            click.echo(f"\nknee: {knee['share']:.0%} of the experts in slots reach {knee['best']:.1%} hits "
                       f"({t.KNEE_SHARE:.0%} of the best); policy: {knee['best_policy']}")
            path = model or _trace_model(trace_file)
            if path is None:
                click.echo("(give the model file too, `offload tune MODEL --trace T`, for the --memory-budget to use)")
                return
            budget = t.budget_for_slots(path, knee["capacity"], ctx_size or _default_ctx(path),
                                        cache_types=dict(cache_type_k=cache_type_k, cache_type_v=cache_type_v))
            command = "chat" if "chat" in main.commands else "generate"
            click.echo(f"use: {t.trace_flags_for(path, budget, knee['best_policy'], command)}"
                       + (f" -c {ctx_size}" if ctx_size else ""))
        return
    path = _model_path(model)
    click.echo(f"tuning {path}: {len(shares)} budgets x {len(policies)} policies x {len(depth_list)} prefetch depths, "
               f"{n_predict} tokens each" + ("" if no_o_direct else ", reading experts with O_DIRECT"), err=True)
    result = t.tune(path, shares=shares, policies=policies, depths=depth_list, prompt=prompt, n_tokens=n_predict,
                    n_threads=threads, o_direct=not no_o_direct, progress=lambda s: click.echo(s, err=True),
                    cache_types=dict(cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=flash_attn))
    click.echo(f"{'budget':>10} {'experts':>8} {'tok/s':>7} {'hits':>6} {'stall':>6} {'MiB/tok':>8}  best setting")
    for r in result.best:
        setting = f"{r.policy}, " + ("no prefetch" if r.prefetch_depth == 0 else f"prefetch depth {r.prefetch_depth}")
        click.echo(f"{r.budget / 2**20:>7.0f}MiB {r.share:>8.0%} {r.tok_s:>7.1f} {r.hit_rate:>6.1%} "
                   f"{r.stall_share:>6.1%} {r.bytes_read_per_token / 2**20:>8.2f}  {setting}")
    xs = [r.budget / 2**20 for r in result.best]
    click.echo("\n" + t.ascii_plot(xs, [r.tok_s for r in result.best]))
    if plot and t.save_plot(plot, xs, {"tok/s (best setting)": [r.tok_s for r in result.best]},
                   result.knee.budget / 2**20 if result.knee else None, "memory budget (MiB)", "decode tok/s"):
        click.echo(f"plot: {plot}")
    if result.knee:
        k = result.knee
        click.echo(f"\nknee: {k.budget / 2**20:.0f} MiB ({k.share:.0%} of the experts) reaches {k.tok_s:.1f} tok/s, "
                   f"{t.KNEE_SHARE:.0%} of the best")
        command = "chat" if "chat" in main.commands else "generate"
        flags = t.flags_for(path, k, command)
        if result.other_io is not None:
            direct, cached = (k, result.other_io) if k.o_direct else (result.other_io, k)
            click.echo(f"reads at the knee: pread + O_DIRECT {direct.tok_s:.1f} tok/s, page cache {cached.tok_s:.1f} "
                       f"tok/s: {'O_DIRECT' if result.o_direct else 'the page cache'} on this machine")
        if k.share < 1.0:
            flags += " --o-direct" if result.o_direct else " --no-o-direct"
        click.echo(f"use: {flags}")


def _trace_model(trace_file: str) -> str | None:
    """The demo model, when a trace was recorded from it (a trace names its model file only)."""
    from .demo import demo_model_path
    from .trace import RoutingTrace

    try:
        demo = demo_model_path()
    except OffloadError:
        return None
    return str(demo) if RoutingTrace.load(trace_file).model == os.path.basename(demo) else None


def _default_ctx(path: str) -> int:
    from . import arch
    from .gguf_file import GGUFFile
    from .model import DEFAULT_N_CTX

    gguf = GGUFFile(path)
    try:
        return min(arch.model_args(gguf).n_ctx_train, DEFAULT_N_CTX)
    finally:
        gguf.close()


def _gate_line(st: dict) -> str:
    """What the prefetch gate (offload.prefetch_gate) chose for the decoding tokens, and why."""
    on, off = st["prefetch_on_tokens"], st["prefetch_off_tokens"]
    line = f"on for {on} of {on + off} decoding tokens"
    saves = st.get("prefetch_saves_seconds_per_token")
    if saves is not None:
        line += f" (measured to {'save' if saves >= 0 else 'cost'} {abs(saves) * 1e3:.2f} ms a token)"
    return line


def _sampling_and_memory_options(f):
    """The `generate` command's sampling and memory flags, same names and defaults."""
    for name in ("flash_attn", "ubatch_size", "cache_type_v", "cache_type_k", "vram_budget", "no_prefetch",
                 "prefetch_depth", "o_direct", "cache_scope", "cache_policy", "memory_budget", "threads", "ctx_size",
                 "seed", "frequency_penalty", "presence_penalty", "repeat_last_n", "repeat_penalty", "min_p", "top_p", "top_k",
                 "temp"):
        opt = next(p for p in generate.params if p.name == name)
        decls = [f"{opt.opts[0]}/{opt.secondary_opts[0]}"] if opt.secondary_opts else opt.opts
        f = click.option(*decls, **{k: getattr(opt, k) for k in ("type", "default", "help", "show_default")},
                         is_flag=opt.is_flag)(f)
    return f


def _options_of(command: click.Command, *names: str):
    """Another command's options, same flags, defaults and help (in the order given)."""

    def decorate(f):
        for name in reversed(names):
            opt = next(p for p in command.params if p.name == name)
            f = click.option(opt.name, *opt.opts,
                             **{k: getattr(opt, k) for k in ("type", "default", "help", "show_default")},
                             is_flag=opt.is_flag)(f)
        return f

    return decorate


CHAT_HELP = """commands:
  /help         this list
  /reset        forget the conversation (the system prompt stays)
  /stats        speed, expert cache hits, bytes read, memory
  /save FILE    write the conversation as JSON, and its KV cache to FILE.kv
  /load FILE    continue a conversation saved with /save (its KV cache too, if it fits this model)
  /exit         leave (also Ctrl-D; Ctrl-C stops a reply, and at the prompt leaves)"""


@main.command()
@model_argument
@click.option("--system", default=None, help="System prompt.")
@click.option("-n", "--n-predict", default=-1, show_default=True,
              help="Tokens per reply at most (-1: until the end of the turn or a full context).")
@_sampling_and_memory_options
@click.option("--chat-template", default=None, help="Jinja chat template to use instead of the model's own.")
@click.option("--chat-template-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the chat template from this file.")
@click.option("--context-shift", is_flag=True,
              help="When the context fills during a reply, drop half of what follows the system prompt (--keep) "
                   "and go on, as llama.cpp; when a new message does not fit, drop the oldest exchanges.")
@_options_of(generate, "n_keep")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default=None,
              help="How long a reasoning model thinks, as its template takes it (gpt-oss; default: the template's, "
                   "medium).")
@click.option("--hide-reasoning", is_flag=True,
              help="Do not show a reasoning model's reasoning (by default it goes to stderr, dimmed on a terminal, "
                   "before the answer on stdout).")
def chat(model, system, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, ctx_size, threads, memory_budget,
         cache_policy, cache_scope, o_direct, prefetch_depth, no_prefetch, chat_template, chat_template_file,
         context_shift, n_keep=None, vram_budget=None, reasoning_effort=None, hide_reasoning=False,
         cache_type_k=DEFAULT_CACHE_TYPE, cache_type_v=DEFAULT_CACHE_TYPE, repeat_last_n=64, presence_penalty=0.0,
         frequency_penalty=0.0, ubatch_size=None, flash_attn="auto") -> None:
    """Chat with MODEL (a GGUF file; default: the demo model) in its own chat template.

    Reads one message per line (from a terminal or a pipe) and streams each reply. Type /help
    for the commands. Ctrl-C stops a reply; Ctrl-C at the prompt or Ctrl-D leaves.

    A reasoning model's reasoning (gpt-oss: its analysis channel) is shown apart from the
    answer: on stderr, dimmed on a terminal, so that stdout holds only the answers;
    --hide-reasoning leaves it out (later turns never see it: the template drops it)."""
    from .chat import ChatSession, ContextFullError, TurnResult
    from .model import DEFAULT_PREFETCH_DEPTH, Model
    from .sampling import SamplingParams

    if chat_template_file:
        with open(chat_template_file, encoding="utf-8") as f:
            chat_template = f.read()
    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
    interactive = sys.stdin.isatty()
    bar = _Progress(enabled=sys.stderr.isatty())
    bar.step("loading the model")
    try:
        m = Model.load(_model_path(model), n_ctx=ctx_size, n_threads=threads, memory_budget=memory_budget,
                       cache_policy=cache_policy, cache_scope=cache_scope, o_direct=o_direct,
                       prefetch=not no_prefetch and depth > 0, prefetch_depth=max(depth, 1),
                       chat_template=chat_template, vram_budget=vram_budget, cache_type_k=cache_type_k,
                       cache_type_v=cache_type_v, context_shift=context_shift, n_keep=n_keep, n_ubatch=ubatch_size,
                       flash_attn=flash_attn)
    except BaseException:
        bar.abort()
        raise
    with m:
        try:
            bar.step("reading the chat template")
            params = SamplingParams(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, presence_penalty,
                                    frequency_penalty)
            session = ChatSession(m, m.chat_template, params, max_tokens=n_predict, system=system,
                                  context_shift=context_shift,
                                  template_vars={"reasoning_effort": reasoning_effort} if reasoning_effort else {})
            bar.step("warming up")
            session.warm_up()
        except BaseException:
            bar.abort()
            raise
        bar.done()
        _memory_line(m, memory_budget)
        if reasoning_effort and "reasoning_effort" not in m.chat_template.template:
            click.echo("offload: note: this chat template has no reasoning effort; --reasoning-effort changes nothing",
                       err=True)
        if interactive:
            click.echo(f"chatting with {m.path} ({m.n_ctx} tokens of context); /help for commands, Ctrl-D to leave",
                       err=True)
        while True:
            try:
                line = _read_message(interactive)
            except KeyboardInterrupt:
                click.echo("", err=True)
                return
            if line is None:
                if interactive:
                    click.echo("", err=True)
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if _slash_command(text, session):
                    return
                continue
            res = TurnResult()
            shown = _ReplyPrinter(show_reasoning=not hide_reasoning)
            try:
                for delta in session.send(line.rstrip("\r\n"), result=res):
                    shown.print(delta)
                shown.end(res)
            except KeyboardInterrupt:
                shown.end_reasoning()
                click.echo("\n[reply stopped]", err=True)
                if res.prompt_tokens:
                    click.echo(_status_line(m, res, session), err=True)
                continue
            except ContextFullError as e:
                click.echo(f"offload: {e}: /reset to start over, or run with --context-shift", err=True)
                continue
            except OffloadError as e:
                click.echo(f"offload: error: {e}", err=True)
                continue
            click.echo(_status_line(m, res, session), err=True)
            if res.stop_reason == "context":
                click.echo(f"the context of {m.n_ctx} tokens is full: /reset to start over"
                           + (" (or continue: the oldest messages will be dropped)" if context_shift else
                              ", or run with --context-shift"), err=True)


@main.command()
@model_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="OFFLOAD_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every /v1 route (also $OFFLOAD_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Let web pages from this origin call the API (repeat for several; * for any).")
@click.option("--alias", default=None, help="The model's name in /v1/models and in responses (default: the file name).")
@click.option("--max-body", default="4MB", show_default=True, help="Largest request body accepted (413 above).")
@_options_of(chat, "n_predict")
@_sampling_and_memory_options
@_options_of(chat, "chat_template", "chat_template_file")
@_options_of(generate, "context_shift", "n_keep")
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests generating at once (llama-server's slots); the context is split between them.")
@click.option("-cb/-nocb", "--cont-batching/--no-cont-batching", default=True, show_default=True,
              help="Decode the slots' tokens as one batch (each expert read once for all), or in turns.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(model, host, port, api_key, cors_origins, alias, max_body, parallel, cont_batching, n_predict, temp, top_k, top_p, min_p,
          repeat_penalty, seed, ctx_size, threads, memory_budget, cache_policy, cache_scope, o_direct, prefetch_depth,
          no_prefetch, vram_budget, chat_template, chat_template_file, verbose, cache_type_k=DEFAULT_CACHE_TYPE,
          cache_type_v=DEFAULT_CACHE_TYPE, context_shift=False, n_keep=None, repeat_last_n=64, presence_penalty=0.0,
          frequency_penalty=0.0, ubatch_size=None, flash_attn="auto") -> None:
    """Serve MODEL (a GGUF file; default: the demo model) over HTTP: OpenAI's API and a chat page.

    Routes: / (the chat page, with a live view of the expert cache), /v1/chat/completions,
    /v1/completions, /v1/models, /health, /metrics. The sampling flags are the defaults of
    requests that leave a field out. Requests are taken in arrival order, one at a time or
    -np at once. Ctrl-C or SIGTERM stops the server."""
    import os

    from .model import DEFAULT_PREFETCH_DEPTH, Model
    from .sampling import SamplingParams
    from .server import ServerConfig, listen, serve as run_server
    from .store import parse_budget

    if chat_template_file:
        with open(chat_template_file, encoding="utf-8") as f:
            chat_template = f.read()
    path = _model_path(model)
    if not os.path.exists(path):
        raise OffloadError(f"{path}: no such file")
    if "%" in max_body:
        raise click.BadParameter(f"{max_body!r} is not a size (examples: 4MB, 512KB)", param_hint="--max-body")
    depth = DEFAULT_PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
    config = ServerConfig(
        model_name=alias or os.path.basename(path),
        sampling=SamplingParams(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, presence_penalty,
                                frequency_penalty),
        max_tokens=n_predict if n_predict > 0 else None,
        api_key=api_key or None,
        cors_origins=tuple(cors_origins),
        max_body_bytes=parse_budget(max_body),
        parallel=parallel,
        cont_batching=cont_batching,
    )

    sock = listen(host, port)
    port = sock.getsockname()[1]  # --port 0: the one the system chose

    def load():
        m = Model.load(path, n_ctx=ctx_size, n_threads=threads, memory_budget=memory_budget,
                       cache_policy=cache_policy, cache_scope=cache_scope, o_direct=o_direct,
                       prefetch=not no_prefetch and depth > 0, prefetch_depth=max(depth, 1),
                       chat_template=chat_template, vram_budget=vram_budget, cache_type_k=cache_type_k,
                       cache_type_v=cache_type_v, context_shift=context_shift, n_keep=n_keep, n_ubatch=ubatch_size,
                       flash_attn=flash_attn)
        from .chat import ChatSession
        from .chat_template import ChatTemplateError

        # the kernels loaded by a first batch, so that the first request's first token is not slow;
        # a chat template that does not compile leaves /v1/completions working
        try:
            ChatSession(m, m.chat_template).warm_up()
        except ChatTemplateError as e:
            click.echo(f"offload: warning: {str(e).rstrip('.')}; /v1/chat/completions will answer 400", err=True)
        _memory_line(m, memory_budget)
        context = (f"{m.n_ctx} tokens of context" if parallel == 1 else
                   f"{parallel} slots of {m.n_ctx // parallel} tokens of context, "
                   + ("decoding as one batch" if cont_batching else "decoding in turns"))
        click.echo(f"offload: serving {path} as {config.model_name!r} ({context}) on "
                   f"http://{host}:{port}/" + (" (API key required)" if api_key else ""), err=True)
        return m

    error = run_server(config, load, sock, log_level="debug" if verbose else "info")
    if error is not None:
        if isinstance(error, OffloadError):
            raise error
        raise OffloadError(f"loading the model failed: {type(error).__name__}: {error}")


class _ReplyPrinter:
    """A reply as it streams: the answer on stdout; reasoning on stderr, dimmed on a terminal
    (click drops the style elsewhere), so that a pipe's stdout holds only answers; a tool call
    (the chat command offers no tools, but a model may call one) as a line on stderr."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.in_reasoning = False

    def print(self, delta) -> None:
        from .harmony import CONTENT, REASONING

        if delta.kind == REASONING:
            if self.show_reasoning and delta.text:
                click.echo(click.style(delta.text, dim=True), nl=False, err=True)
                self.in_reasoning = True
        elif delta.kind == CONTENT:
            self.end_reasoning()
            click.echo(delta.text, nl=False)

    def end_reasoning(self) -> None:
        if self.in_reasoning:
            click.echo("", err=True)
            self.in_reasoning = False

    def end(self, res) -> None:
        self.end_reasoning()
        click.echo()
        for call in res.tool_calls:
            f = call["function"]
            click.echo(f"[tool call: {f['name']} {f['arguments']}]", err=True)


class _Progress:
    """Loading and warm-up stages as a bar on stderr, only when stderr is a terminal."""

    STAGES = 3

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.n = 0

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * self.n // self.STAGES
        click.echo(f"\r[{'#' * filled}{'-' * (width - filled)}] {label:<28}", nl=False, err=True)
        self.n += 1

    def abort(self) -> None:
        """End the bar's line, so that an error message starts a line of its own."""
        if self.enabled and self.n:
            click.echo("", err=True)
            self.n = 0

    def done(self) -> None:
        if self.enabled:
            click.echo(f"\r[{'#' * 30}] {'ready':<28}", err=True)


def _memory_line(m, memory_budget) -> None:
    from .summary import human_bytes as hb

    p = m.plan
    if m.context_note:
        click.echo(m.context_note, err=True)
    tiered = m.stats()["cache_policy"] != "resident"
    if p is not None and p.pools and (tiered or memory_budget is not None):
        where = ("every expert loaded" if p.all_resident else
                 f"{p.slots} expert slots ({p.share:.0%} of experts), cold ones read from the file"
                 + (f" with O_DIRECT ({p.o_direct_reason})" if p.o_direct_reason else ""))
        ubatch = f"; micro-batch {p.n_ubatch} tokens ({p.ubatch_source})" if p.n_ubatch != p.default_ubatch else ""
        click.echo(f"memory budget {hb(p.budget)} ({p.budget_source}): {hb(p.fixed)} resident; {where}{ubatch}",
                   err=True)
    if m.transformer.gpu is not None:
        click.echo(f"{m.transformer.gpu.device.name}: {m.transformer.gpu.plan.describe()}", err=True)


def _read_message(interactive: bool) -> str | None:
    """One message: a line typed at the prompt, or read from a pipe; None at end of input."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def _status_line(m, res, session) -> str:
    st = m.stats()
    tok_s = res.completion_tokens / res.generate_seconds if res.generate_seconds else 0.0
    experts = (f"expert hits {st['hits_last'] / (st['hits_last'] + st['misses_last']):.0%}"
               if st["cache_policy"] != "resident" and st["hits_last"] + st["misses_last"] else "experts resident")
    used = m.transformer.cache.n_past
    ttft = res.time_to_first_token
    first = f"{ttft * 1000:.0f} ms" if ttft < 1 else f"{ttft:.2f} s"
    shifts = m.last_generation.context_shifts
    return (f"[{res.completion_tokens} tokens, {tok_s:.1f} tok/s, first token {first} "
            f"({res.new_prompt_tokens} new prompt tokens, {res.cached_tokens} reused), {experts}, "
            f"context {used}/{m.n_ctx}" + (f" (shifted {shifts}x)" if shifts else "") + f", stop: {res.stop_reason}]")


def _slash_command(text: str, session) -> bool:
    """Run a /command; True when it asks to leave."""
    from .summary import human_bytes as hb

    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    m = session.model
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/help":
        click.echo(CHAT_HELP, err=True)
    elif cmd == "/reset":
        session.reset()
        click.echo("conversation reset", err=True)
    elif cmd == "/stats":
        st = m.stats()
        turns = session.turns
        gen = sum(t.completion_tokens for t in turns)
        secs = sum(t.generate_seconds for t in turns)
        last = session.last
        lines = [
            f"turns {len(turns)}, messages {len(session.messages)}, context {m.transformer.cache.n_past}/{m.n_ctx} tokens",
            f"decode {gen / secs if secs else 0.0:.1f} tok/s over {gen} tokens"
            + (f"; last reply {last.completion_tokens} tokens, first token {last.time_to_first_token * 1000:.0f} ms"
               if last else ""),
            f"experts: {st['cache_policy']}, hit rate {st['hit_rate']:.1%} ({st['hits']} hits, {st['misses']} misses), "
            f"{hb(st['bytes_read'])} read, {st['stall_seconds']:.2f} s stalled on I/O",
            f"memory: RSS {hb(st['resident_bytes'])} (peak {hb(st['peak_rss_bytes'])}), KV cache {hb(st['kv_cache_bytes'])}"
            + (f", budget {hb(st['memory_budget'])}" if st["memory_budget"] else ""),
        ]
        click.echo("\n".join(lines), err=True)
    elif cmd == "/save":
        if not arg:
            click.echo("usage: /save FILE", err=True)
        else:
            try:
                session.save(arg)
                click.echo(f"saved {len(session.messages)} messages to {arg} and the KV cache "
                           f"({m.transformer.cache.n_past} tokens) to {arg}.kv", err=True)
            except OSError as e:
                click.echo(f"offload: cannot write {arg}: {e.strerror or e}", err=True)
    elif cmd == "/load":
        if not arg:
            click.echo("usage: /load FILE", err=True)
        else:
            try:
                restored = session.load(arg)
                click.echo(f"loaded {len(session.messages)} messages from {arg}"
                           + (f", {restored} tokens into the KV cache" if restored else
                              " (no KV state beside it: the next turn runs the conversation again)"), err=True)
            except OffloadError as e:
                click.echo(f"offload: {e}", err=True)
    else:
        click.echo(f"unknown command {cmd}; /help lists them", err=True)
    return False
