"""The `offload` command: inspect a model file, generate text.

Flag names follow llama.cpp's (`-p`, `-n`, `-c`, `-t`, `--temp`, ...) where the concept
is the same. A problem with the user's input ends the command with one line on stderr
and exit code 1; Ctrl-C ends it with 130.
"""

from __future__ import annotations

import sys

import click

from .errors import OffloadError


class _Group(click.Group):
    """Turns OffloadError into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
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


@main.command()
@model_argument
@click.option("-c", "--ctx-size", type=int, default=0, help="Context size to plan for (0: min(trained, 4096)).")
@click.option("--memory-budget", default=None, help="Print the memory plan for this budget (6GB, 6GiB, 512MB, 60%).")
@click.option("--cache-scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Expert slots shared by all layers, or a quota per layer.")
@click.option("--o-direct", is_flag=True, help="Plan slots for O_DIRECT reads.")
def inspect(model: str | None, ctx_size: int, memory_budget: str | None, cache_scope: str, o_direct: bool) -> None:
    """What is in MODEL and what it needs to run."""
    from . import arch
    from .gguf_file import GGUFFile
    from .model import DEFAULT_N_CTX
    from .summary import format_summary, summarize
    from .weights import unsupported_tensor

    path = _model_path(model)
    gguf = GGUFFile(path)
    args = arch.model_args(gguf)
    n_ctx = ctx_size if ctx_size > 0 else min(args.n_ctx_train, DEFAULT_N_CTX)
    from .store import parse_budget

    budget = parse_budget(memory_budget) if memory_budget is not None else None
    click.echo(format_summary(path, summarize(gguf, args, n_ctx, budget, scope=cache_scope, o_direct=o_direct)))
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
@click.option("--repeat-penalty", default=1.0, show_default=True, help="Penalize the last 64 tokens (1: off).")
@click.option("--seed", type=int, default=None, help="Random seed (default: random).")
@click.option("-c", "--ctx-size", type=int, default=0, help="Context size (0: min(trained, 4096)).")
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: all cores).")
@click.option("--memory-budget", default=None,
              help="Cap on what the model keeps in RAM: 6GB, 6GiB, 512MB, 60% (default: 75% of available RAM).")
@click.option("--cache-policy", type=click.Choice(["lrfu", "lru", "lfu"]), default="lrfu", show_default=True,
              help="Which cached expert to evict: frequency+recency, least recently or least frequently used.")
@click.option("--cache-scope", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="Expert slots shared by all layers, or a quota per layer.")
@click.option("--o-direct", is_flag=True, help="Read experts with O_DIRECT (bypass the page cache).")
def generate(model, prompt, n_predict, temp, top_k, top_p, min_p, repeat_penalty, seed, ctx_size, threads,
             memory_budget, cache_policy, cache_scope, o_direct) -> None:
    """Continue PROMPT with MODEL (a GGUF file; default: the demo model)."""
    from .model import Model
    from .summary import human_bytes as hb

    with Model.load(_model_path(model), n_ctx=ctx_size, n_threads=threads, memory_budget=memory_budget,
                    cache_policy=cache_policy, cache_scope=cache_scope, o_direct=o_direct) as m:
        p = m.plan
        tiered = m.stats()["cache_policy"] != "resident"
        if p is not None and p.pools and (tiered or memory_budget is not None):
            where = ("every expert loaded" if p.all_resident else
                     f"{p.slots} expert slots ({p.share:.0%} of experts), cold ones read from the file")
            click.echo(f"memory budget {hb(p.budget)} ({p.budget_source}): {hb(p.fixed)} resident; {where}", err=True)
        click.echo(prompt, nl=False)
        for piece in m.generate(prompt, max_tokens=n_predict, temperature=temp, top_k=top_k, top_p=top_p,
                                min_p=min_p, repeat_penalty=repeat_penalty, seed=seed):
            click.echo(piece, nl=False)
        click.echo()
        g = m.last_generation
        click.echo(
            f"prompt {g.prompt_tokens} tokens at {g.prompt_tok_s:.1f} tok/s; "
            f"generated {g.generated_tokens} tokens at {g.decode_tok_s:.1f} tok/s (stop: {g.stop_reason})",
            err=True,
        )
        st = m.stats()
        if tiered:
            click.echo(
                f"experts: {st['hits_last']} hits, {st['misses_last']} misses, {hb(st['bytes_read_per_token'])} read "
                f"per token, {st['stall_seconds_last']:.2f} s stalled on I/O ({st['cache_policy']}); "
                f"RSS {hb(st['resident_bytes'])} (peak {hb(st['peak_rss_bytes'])})",
                err=True,
            )
