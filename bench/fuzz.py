"""Fuzz offload's loading of hostile GGUF files, many more cases than CI runs.

Two kinds of cases, each loaded with `Model.load`, then tokenize, logits and detokenize:

* metadata: 1-3 hyperparameter or vocabulary keys of a tiny model set to hostile values
  (zero, huge, negative, NaN, the wrong type, removed), as tests/test_reliability.py does;
* bytes: random bytes of the file's first 64 KiB (header, metadata, tensor table) changed.

Every case must load and compute finite logits, or fail with a one-line OffloadError.
Anything else is a bug: another exception, a multi-line message, or the process dying
(llama.cpp aborts on some vocabularies; a SIGSEGV or SIGBUS in a kernel). Cases run in
child processes so that a crash is counted and the run goes on.

    python bench/fuzz.py --cases 2000 --json fuzz.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
        "llama.attention.value_length", "llama.rope.dimension_count", "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon", "llama.expert_count", "llama.expert_used_count", "llama.vocab_size",
        "general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.add_bos_token",
        "llama.rope.scaling.type", "llama.rope.scaling.factor"]


def hostile_value(rng: random.Random):
    from gguf import GGUFValueType as V

    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([0, 1, 2, 3, 7, 15, 16, 17, 64, 2**16, 2**31 - 1, 2**32 - 1]), V.UINT32
    if kind == 1:
        return rng.choice([-1, -100, -2**31]), V.INT32
    if kind == 2:
        return rng.choice([0.0, -1.0, math.nan, math.inf, -math.inf, 1e38, 1e-45]), V.FLOAT32
    if kind == 3:
        return rng.choice(["", "llama", "gpt2", "none", "qwen3moe", "deepseek2", "yarn", "x" * 300]), V.STRING
    if kind == 4:
        return rng.choice([[1, 2], ["a"], ["<s>"] * 3, list(range(300))]), V.ARRAY
    return None


def run_case(base: Path, work: Path, kind: str, seed: int) -> tuple[str, str]:
    """('ok' | 'refused' | 'bug', detail) for one case."""
    import numpy as np

    from offload import Model
    from offload.errors import OffloadError
    from offload.testing import rewrite_gguf

    rng = random.Random(seed)
    path = work / f"case-{os.getpid()}.gguf"
    if kind == "metadata":
        changes = {k: hostile_value(rng) for k in rng.sample(KEYS, rng.randint(1, 3))}
        try:
            rewrite_gguf(base, path, changes)
        except (ValueError, TypeError, OverflowError):
            return "skipped", "gguf-py cannot write it"
        detail = repr({k: (v if v is None or len(repr(v)) < 60 else "...") for k, v in changes.items()})
    else:
        data = bytearray(base.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(min(len(data), 65536))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        detail = f"bytes seed {seed}"
    try:
        with Model.load(path, n_ctx=64) as m:
            ids = m.tokenize("the end")[: m.n_ctx]
            logits = m.logits(ids)
            if not np.isfinite(logits).all():
                return "bug", detail + ": non-finite logits without an error"
            m.detokenize([int(np.argmax(logits[-1]))])
        return "ok", detail
    except OffloadError as e:
        return ("refused", detail) if "\n" not in str(e) else ("bug", detail + ": multi-line message")
    except Exception as e:  # noqa: BLE001 - the point of the exercise
        return "bug", f"{detail}: {type(e).__name__}: {e}"


def child(base: Path, kind: str, start: int, count: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        for seed in range(start, start + count):
            print(f"START {seed}", flush=True)
            outcome, detail = run_case(base, Path(work), kind, seed)
            print(json.dumps({"seed": seed, "outcome": outcome, "detail": detail[:300]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=500, help="cases of each kind")
    ap.add_argument("--kinds", default="metadata,bytes")
    ap.add_argument("--batch", type=int, default=100, help="cases per child process")
    ap.add_argument("--json", default="fuzz.json")
    ap.add_argument("--child", nargs=4, metavar=("BASE", "KIND", "START", "COUNT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(Path(a.child[0]), a.child[1], int(a.child[2]), int(a.child[3]))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from offload.testing import TinyConfig, rewrite_gguf, write_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_reliability import _SMALL_VOCAB_KEYS

    results: dict[str, dict] = {}
    bugs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = rewrite_gguf(write_model(Path(tmp) / "big.gguf", TinyConfig(), "F32"), Path(tmp) / "base.gguf",
                            _SMALL_VOCAB_KEYS)
        for kind in a.kinds.split(","):
            counts = {"ok": 0, "refused": 0, "skipped": 0, "bug": 0, "crashed": 0}
            t0 = time.perf_counter()
            seed = 0
            while seed < a.cases:
                n = min(a.batch, a.cases - seed)
                proc = subprocess.run([sys.executable, __file__, "--child", str(base), kind, str(seed), str(n)],
                                      capture_output=True, text=True)
                done, started = set(), None
                for line in proc.stdout.splitlines():
                    if line.startswith("START "):
                        started = int(line.split()[1])
                    elif line.startswith("{"):
                        r = json.loads(line)
                        done.add(r["seed"])
                        counts[r["outcome"]] += 1
                        if r["outcome"] == "bug":
                            bugs.append(dict(r, kind=kind))
                if proc.returncode != 0 and started is not None and started not in done:  # the child died on it
                    counts["crashed"] += 1
                    bugs.append({"kind": kind, "seed": started, "outcome": "crashed",
                                 "detail": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"})
                    seed = started + 1
                else:
                    seed += n
            results[kind] = dict(counts, seconds=round(time.perf_counter() - t0, 1))
    print(f"{'kind':10} {'cases':>6} {'loaded':>7} {'refused':>8} {'skipped':>8} {'bugs':>5} {'crashes':>8} {'s':>7}")
    for kind, c in results.items():
        total = sum(c[k] for k in ("ok", "refused", "skipped", "bug", "crashed"))
        print(f"{kind:10} {total:6d} {c['ok']:7d} {c['refused']:8d} {c['skipped']:8d} {c['bug']:5d} {c['crashed']:8d} "
              f"{c['seconds']:7.1f}")
    for b in bugs[:20]:
        print(f"  {b['kind']} seed {b['seed']}: {b['outcome']}: {b['detail']}")
    Path(a.json).write_text(json.dumps({"results": results, "bugs": bugs}, indent=2))


if __name__ == "__main__":
    main()
