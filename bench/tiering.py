"""The tiered expert store under memory budgets, against llama.cpp under the same memory cap.

    .venv/bin/python bench/tiering.py [--model M.gguf] [--decode 64] [--budgets min,10%,25%,0.5x,75%,100%]
                                      [--policy lrfu] [--threads 2] [--max-seconds 60] [--wait-quiet S]
                                      [--no-llama-cpp] [--no-cap-offload] [--prefetch-depth 0,1,2 | --no-prefetch]
                                      [--prefetch-modes auto,always]
                                      [--shape default|large] [--no-belady]

Issue 20's run: `--shape large --budgets 0.25x,0.5x,0.75x --prefetch-depth 0,1 --prefetch-modes auto,always` (a 2.6 GB
model, 16 layers x 64 experts of 2.5 MiB, top-2; writing it takes minutes and ~3 GB of disk
the first time; each run reads GBs: expect tens of minutes on a slow disk).

Without --model it makes (once, cached in ~/.cache/offload/bench) a random-weight llama-arch
MoE with many experts (12 layers x 64 experts of 816 KiB, top-4, Q8_0: 612 MiB of experts
in a 655 MiB file, 7x its minimum budget) and skews its routers (some experts' router rows are scaled up, so they
win more often, as real models' routing is skewed; uniform random routing would make
every policy look alike). Budgets: "min" (the plan's minimum), a share of the experts
("25%": the minimum plus a quarter of the experts' slots; "100%": every expert resident),
a share of the model file ("0.5x": half the file's size, the target's cap) or a size
("64MiB").

Per budget, each engine runs in a child process of its own, after `sync; echo 3 >
/proc/sys/vm/drop_caches` (so disk is disk, and every run starts cold), with the same
threads, the same prompt token ids and the same number of greedy decode tokens (EOS
ignored). Each child is moved into a fresh memory cgroup whose limit is the budget after
its imports and before it loads the model, so the cap covers what the model adds to the
process, page cache included, as offload's budget does:

* offload: `Model.load(memory_budget=B, o_direct=True)`; decode tok/s and, over the decode
  tokens: hit rate (expert uses served by a slot that held the expert before its layer
  ran; an expert prefetched for its own layer counts as a read), MiB read per token, stall
  share (seconds waiting for expert reads / decode seconds), the peak RSS growth over the
  RSS before `Model.load`. `--no-cap-offload`: its cgroup only measures. `--prefetch-depth`
  (a list: one offload row per depth and budget; 0 or `--no-prefetch`: no prediction) sets
  how many MoE layers ahead the lookahead predictor prefetches; each row reports the
  predictions' recall and precision per distance over the decode tokens, the prefetched
  MiB per token that went unused, and the reads cancelled. `--prefetch-modes`: per depth,
  "auto" (decoding tokens prefetch while offload.prefetch_gate measures it faster than not;
  the row shows the share of tokens that did) and/or "always".
* llama.cpp (llama-cpp-python on the file's memory map, `use_extra_bufts` off, offload's KV cache type,
  as bench/decode.py runs it): decode tok/s and MiB read per token (/proc/self/io: page
  faults and their readahead).
* the bound: 1 / (compute seconds per token + offload's bytes read per token / disk read
  bandwidth); compute from offload at the full budget, warm (no I/O, the best of three
  runs), the bandwidth from one O_DIRECT sequential read of the model file in 8 MiB blocks.

The cgroup is v1's memory controller (memory.limit_in_bytes, memory.max_usage_in_bytes)
where it is mounted, else v2's (memory.max, memory.peak); each run's group is made under
this process's own memory cgroup and removed when the run ends. Needs root (cgroups,
drop_caches); without it the runs go on, uncapped and with warm caches, and the summary
says so. The machine's other work is measured during each run (`others_cpu_cores` in the
JSON; `--wait-quiet S` waits for a quiet machine first). Each offload row also gets the hit rate its
policy would have with its slots and no prefetch, beside Belady's optimum at the same
slots, over the same decode steps (a routing trace recorded in this process, teacher-forced
on the tokens of the warm run; `--no-belady` skips it). Every run's tokens must equal
those of the warm full-budget run (the store changes speed, never results); llama.cpp's
are compared too. Prints a table, writes bench/out/tiering.json and, when matplotlib is
installed (`pip install -e .[bench]`), bench/out/tiering.png.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, print_table, write_json  # noqa: E402

CACHE = Path.home() / ".cache" / "offload" / "bench"
PROMPT = "Once upon a time, in a land far away, there lived a"
N_CTX = 256  # both engines: the prompt and the decode tokens fit, and the KV cache is small
TARGET_BUDGET = "0.5x"  # the spec's cap: half the model's size ...
TARGET_RATIO = 1.5  # ... where offload should decode >= 1.5x llama.cpp's tok/s
TARGETS = {"0.5x": 3.0, "0.25x": 1.5}  # issue 20, on a 2-4 GB model (--shape large)


def _shape():
    from offload.testing import TinyConfig

    return TinyConfig(n_layer=12, n_embd=512, n_head=8, n_head_kv=2, head_dim=64, n_ff=512, n_expert=64,
                      n_expert_used=4, n_ctx=512)


def _large_shape():
    """Issue 20's scale: 16 layers x 64 experts of 1024 x 768 (2.5 MiB in Q8_0), top-2: 2.6 GB."""
    from offload.testing import TinyConfig

    return TinyConfig(n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_ff=768, n_expert=64,
                      n_expert_used=2, n_ctx=512)


def _warm_shape():
    from offload.testing import TinyConfig

    return TinyConfig(n_layer=1, n_embd=64, n_head=2, n_head_kv=1, head_dim=32, n_ff=64, n_expert=4,
                      n_expert_used=2, n_ctx=64)


# -- the model -------------------------------------------------------------------------

def skew_routers(path: Path, skew: float, seed: int = 0) -> None:
    """Scale each layer's router rows by 1 + skew / (1 + rank), ranks a random permutation:
    experts with bigger rows get bigger logits (when positive) and are chosen more often."""
    from offload.gguf_file import GGUFFile

    g = GGUFFile(path)
    try:
        tensors = [(t.offset, t.shape) for t in g.tensors.values() if t.name.endswith("ffn_gate_inp.weight")]
    finally:
        g.close()
    rng = np.random.default_rng(seed)
    mm = np.memmap(path, dtype=np.uint8, mode="r+")
    for offset, (n_cols, n_rows) in tensors:
        w = mm[offset : offset + n_rows * n_cols * 4].view(np.float32).reshape(n_rows, n_cols)
        scale = 1.0 + skew / (1.0 + rng.permutation(n_rows))
        w *= scale[:, None].astype(np.float32)
    mm.flush()
    del mm


def cached_model(name: str, config, skew: float = 0.0) -> Path:
    from offload.testing import write_model

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / name
    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        part = Path(str(path) + ".part")
        write_model(part, config, "Q8_0", seed=0)
        if skew:
            skew_routers(part, skew)
        part.rename(path)
    return path


def default_model(skew: float, shape: str = "default") -> Path:
    c = _large_shape() if shape == "large" else _shape()
    return cached_model(f"tiering-{c.n_layer}x{c.n_expert}x{c.n_embd}x{c.n_ff}-Q8_0-skew{skew:g}.gguf", c, skew)


def warm_model() -> Path:
    return cached_model("tiering-warmup-Q8_0.gguf", _warm_shape())


def routing_vs_belady(path: Path, prompt: list[int], tokens: list[int], slots: list[int], policy: str,
                      threads: int) -> dict[int, dict]:
    """Per slot count: the hit rate `policy` gets over the decode steps with no prefetch, and
    Belady's, replaying a routing trace of prompt + tokens (teacher-forced: the same routing
    as the runs, whose tokens these are)."""
    from offload import Model
    from offload.simulate import accesses, belady, simulate
    from offload.trace import TraceRecorder

    with Model.load(path, n_ctx=N_CTX, n_threads=threads) as m:
        rec = TraceRecorder(m.args.n_expert, m.args.n_expert_used, position=lambda: m.transformer.cache.n_past,
                            model=path.name)
        m.transformer.reset()
        m.transformer.recorder = rec
        rec.add_tokens(prompt, prompt=True)
        m.transformer.forward(np.array(prompt, dtype=np.int64))
        for t in tokens[:-1]:
            rec.add_tokens([t])
            m.transformer.forward(np.array([t], dtype=np.int64))
        m.transformer.recorder = None
        trace = rec.finish()
    stream = accesses(trace)
    out = {}
    for n in sorted(set(slots)):
        opt = belady(trace, n, "global", trace.prompt_tokens, stream=stream).hit_rate
        hit = simulate(trace, n, policy, "global", trace.prompt_tokens, stream=stream).hit_rate
        out[n] = {"policy_hit_rate": hit, "belady_hit_rate": opt, "of_belady": hit / opt if opt else 1.0}
    return out


def make_plan_for(path: Path, budget: int = 0, o_direct: bool = True):
    from offload import arch
    from offload.gguf_file import GGUFFile
    from offload.store import make_plan

    g = GGUFFile(path)
    try:
        return make_plan(g, arch.model_args(g), N_CTX, budget, o_direct=o_direct)
    finally:
        g.close()


def budgets_for(path: Path, specs: list[str]) -> list[tuple[str, int]]:
    from offload.store import parse_budget

    p = make_plan_for(path)
    file_size = path.stat().st_size
    out = []
    for s in specs:
        if s == "min":
            out.append((s, p.minimum))
        elif s.endswith("%"):
            share = float(s[:-1]) / 100
            extra = sum(int((pool.n_experts - pool.min_slots) * share) * pool.slot_bytes for pool in p.pools)
            out.append((s, min(p.full, p.minimum + extra)))
        elif s.endswith("x"):
            b = int(float(s[:-1]) * file_size)
            if b < p.minimum:
                sys.exit(f"budget {s} ({b} bytes) is below the model's minimum of {p.minimum} bytes")
            out.append((s, b))
        else:
            out.append((s, parse_budget(s)))
    return out


# -- the machine: page cache, disk, cgroups ------------------------------------------------

def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False when it could not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read_bandwidth(path: Path, block: int = 8 << 20) -> float:
    """Bytes/s of one O_DIRECT sequential read of the whole file in `block`-byte reads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, block)
    try:
        total, t0, off = 0, time.perf_counter(), 0
        while True:
            n = os.preadv(fd, [buf], off)
            total += n
            off += n
            if n < block:
                break
        return total / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()


def read_ahead_kb(path: Path) -> int | None:
    """The readahead of the block device holding `path` (what a page fault in a memory map
    reads around itself, at most), from /sys/dev/block."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for q in (dev / "queue" / "read_ahead_kb", dev / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(q.read_text())
        except (OSError, ValueError):
            continue
    return None


class MemoryCgroup:
    """One memory cgroup (v1 or v2) under this process's own, removed by remove()."""

    V1_ROOT = Path("/sys/fs/cgroup/memory")

    @classmethod
    def version(cls) -> str | None:
        if (cls.V1_ROOT / "memory.limit_in_bytes").exists():
            return "v1"
        root = cls._v2_root()
        return "v2" if root is not None else None

    @staticmethod
    def _v2_root() -> Path | None:
        for line in open("/proc/mounts"):
            dev, mnt, fstype = line.split()[:3]
            if fstype == "cgroup2":
                ctl = Path(mnt) / "cgroup.controllers"
                if ctl.exists() and "memory" in ctl.read_text().split():
                    return Path(mnt)
        return None

    @classmethod
    def _own(cls, version: str) -> Path:
        """This process's memory cgroup directory."""
        for line in open("/proc/self/cgroup"):
            hid, ctrls, rel = line.rstrip("\n").split(":", 2)
            if version == "v1" and "memory" in ctrls.split(","):
                return cls.V1_ROOT / rel.lstrip("/")
            if version == "v2" and hid == "0":
                return cls._v2_root() / rel.lstrip("/")
        return cls.V1_ROOT if version == "v1" else cls._v2_root()

    def __init__(self, name: str, limit: int | None):
        v = self.version()
        if v is None:
            raise OSError("no memory cgroup controller (v1 or v2) on this machine")
        self.v = v
        parent = self._own(v)
        if v == "v2":  # the memory controller must be enabled for the parent's children
            try:
                (parent / "cgroup.subtree_control").write_text("+memory")
            except OSError:
                pass
        limit_file = "memory.limit_in_bytes" if v == "v1" else "memory.max"
        root = self.V1_ROOT if v == "v1" else self._v2_root()
        for where in dict.fromkeys([parent, root]):  # our own group, else the hierarchy's root
            self.path = where / name
            try:
                self.path.mkdir()
            except OSError:
                continue
            if (self.path / limit_file).exists():  # v2: only where the parent delegates memory
                break
            self.path.rmdir()
        else:
            raise OSError(f"cannot make a memory cgroup under {parent} or {root}")
        if limit is not None:
            self._write(limit_file, str(limit))

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def peak(self) -> int | None:
        try:
            return int(self._read("memory.max_usage_in_bytes" if self.v == "v1" else "memory.peak"))
        except (OSError, ValueError):
            return None

    def stat(self) -> dict:
        """memory.stat's counters (bytes of page cache, anonymous memory ...)."""
        try:
            return {k: int(v) for k, v in (line.split() for line in self._read("memory.stat").splitlines())}
        except (OSError, ValueError):
            return {}

    def oom_kills(self) -> int:
        try:
            text = self._read("memory.oom_control" if self.v == "v1" else "memory.events")
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, n = line.partition(" ")
            if k == "oom_kill":
                return int(n)
        return 0

    def remove(self) -> None:
        """Remove the group (its processes have ended; wait a little for the kernel)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        raise OSError(f"could not remove cgroup {self.path}")


# -- a run, in a child process ----------------------------------------------------------

def run_child(spec: dict, cap: int | None, timeout_s: float, use_cgroup: bool) -> dict:
    """Start `spec` in a child process; once its imports are done, move it into a fresh
    memory cgroup (limit `cap`), drop the page cache and let it run; its result."""
    if WAIT_QUIET_S:
        wait_quiet(WAIT_QUIET_S)
    cpu0, kids0, t0 = _busy_seconds(), _children_cpu(), time.perf_counter()
    result = _run_child(spec, cap, timeout_s, use_cgroup)
    # CPU the rest of the machine took meanwhile (another user's work slows both engines)
    wall = time.perf_counter() - t0
    result["others_cpu_cores"] = max(0.0, (_busy_seconds() - cpu0) - (_children_cpu() - kids0)) / wall
    return result


WAIT_QUIET_S = 0.0  # --wait-quiet


def wait_quiet(limit_s: float, idle_cores: float = 0.25, window_s: float = 2.0) -> None:
    """Wait (at most limit_s) until the machine's other work takes under `idle_cores` cores."""
    end = time.perf_counter() + limit_s
    while time.perf_counter() < end:
        b = _busy_seconds()
        time.sleep(window_s)
        if (_busy_seconds() - b) / window_s < idle_cores:
            return
    print(f"  (the machine stayed busy for {limit_s:.0f} s; running anyway)", file=sys.stderr)


def _busy_seconds() -> float:
    """CPU seconds every core has spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_child(spec: dict, cap: int | None, timeout_s: float, use_cgroup: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    group = None
    try:
        line = child.stdout.readline()
        if line.strip() != "ready":
            child.wait()
            raise RuntimeError(f"{spec['engine']} child did not start (exit {child.returncode})")
        if use_cgroup:
            # rounded up to a page: the kernel rounds a limit down, and offload refuses a budget over its limit
            group = MemoryCgroup(f"offload-bench-{os.getpid()}-{spec['engine']}",
                                 None if cap is None else -(-cap // 4096) * 4096)
            group.add(child.pid)
        dropped = drop_caches() if spec.get("drop_caches", True) else False
        child.stdin.write("go\n")
        child.stdin.flush()
        try:
            out, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return {"error": f"killed after {timeout_s:.0f} s", "caches_dropped": dropped}
        result = None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
        if result is None:
            oom = group.oom_kills() if group else 0
            why = "OOM-killed in its cgroup" if oom else f"exited with {child.returncode}"
            return {"error": why, "caches_dropped": dropped}
        result["caches_dropped"] = dropped
        result["cgroup_peak"] = group.peak() if group else None
        result["cgroup"] = str(group.path) if group else None
        result["cgroup_cap"] = cap if group else None
        if group:  # what stays charged once the child is gone: its page cache
            st = group.stat()
            result["cgroup_cache_at_end"] = st.get("cache", st.get("file"))
        return result
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if group is not None:
            group.remove()


def _ready_then_wait() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(1)


def _read_bytes() -> int:
    """Bytes this process had read from storage (/proc/self/io read_bytes)."""
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child_offload(spec: dict) -> dict:
    from offload import Model
    from offload.store import TieredExperts, make_plan  # noqa: F401

    # compile / load every kernel the run uses on a tiny model of the same formats first,
    # so that the run's RSS and cgroup peak are the model's, not the JIT's
    warm = warm_model()
    m = Model.load(warm, memory_budget=make_plan_for(warm).minimum, o_direct=True, n_threads=spec["threads"],
                   n_ctx=N_CTX, cache_policy=spec["policy"])
    try:
        logits = m.transformer.forward(np.array(spec["prompt"][:4], dtype=np.int64) % m.args.n_vocab)[-1]
        for _ in range(2):
            logits = m.transformer.forward(np.array([int(np.argmax(logits))]))[-1]
    finally:
        m.close()
        del m
    import gc

    gc.collect()
    _ready_then_wait()

    _peak_reset()
    base = _rss()
    t0 = time.perf_counter()
    depth = spec.get("prefetch_depth", 1)
    mode = {"auto": True, "always": "always"}[spec.get("prefetch_mode", "auto")] if depth > 0 else False
    m = Model.load(spec["model"], memory_budget=spec["budget"], o_direct=True, n_threads=spec["threads"],
                   n_ctx=N_CTX, cache_policy=spec["policy"], prefetch=mode, prefetch_depth=max(depth, 1))
    load_s = time.perf_counter() - t0
    prefetcher = m.transformer.prefetcher
    if prefetcher is not None and spec.get("prefetch_margin") is not None:
        prefetcher.predictor.margin = spec["prefetch_margin"]  # extra experts per layer when the choice is close

    def counters() -> dict:
        s = m.experts.stats.as_dict() if isinstance(m.experts, TieredExperts) else {}
        return {k: s.get(k, 0) for k in ("hits", "misses", "bytes_read", "stall_seconds", "prefetch_hits",
                                         "prefetches", "prefetch_wasted_bytes", "prefetch_cancelled",
                                         "prefetch_skipped_late")}

    try:
        best = None
        for _ in range(spec.get("repeats", 1)):  # the fastest decode counts
            t = m.transformer
            t.reset()
            t0 = time.perf_counter()
            logits = t.forward(np.array(spec["prompt"], dtype=np.int64))[-1]
            prompt_s = time.perf_counter() - t0
            if prefetcher is not None:
                prefetcher.metrics.reset()  # predictions over the decode tokens only
                gate0 = dict(prefetcher.gate.tokens)
            before, io0 = counters(), _read_bytes()
            tokens = []
            t0 = time.perf_counter()
            for _ in range(spec["decode"]):
                tok = int(np.argmax(logits))
                tokens.append(tok)
                logits = t.forward(np.array([tok], dtype=np.int64))[-1]
                if time.perf_counter() - t0 > spec["max_seconds"]:
                    break
            decode_s = time.perf_counter() - t0
            after, io1 = counters(), _read_bytes()
            pred = prefetcher.metrics.by_distance() if prefetcher is not None else {}
            on = prefetcher.gate.tokens[True] - gate0[True] if prefetcher is not None else 0
            if best is None or decode_s / len(tokens) < best[0] / len(best[1]):
                best = (decode_s, tokens, prompt_s, before, after, io0, io1, pred, on)
        decode_s, tokens, prompt_s, before, after, io0, io1, pred, on = best
        d = {k: after[k] - before[k] for k in after}
        n = len(tokens)
        return {
            "prefetch_depth": depth,
            "prefetch_mode": spec.get("prefetch_mode", "auto") if depth > 0 else "-",
            "prefetch_on_share": on / n,  # decoding tokens the gate ran with prefetching
            "prediction": {str(k): v for k, v in pred.items()},
            "prefetches_per_token": d["prefetches"] / n,
            "prefetch_wasted_per_token": d["prefetch_wasted_bytes"] / n,
            "prefetch_cancelled": d["prefetch_cancelled"],
            "prefetch_skipped_late_per_token": d["prefetch_skipped_late"] / n,
            "engine": "offload", "budget": spec["budget"], "policy": spec["policy"],
            "slots": m.plan.slots, "experts": m.plan.n_experts, "load_s": load_s, "prompt_s": prompt_s,
            "decode_tokens": n, "decode_s": decode_s, "decode_tok_s": n / decode_s,
            # uses served by a slot that held the expert before its layer ran (a prefetched
            # expert is a read, not a hit, here; the store's own hit rate counts it as a hit)
            "hit_rate": (d["hits"] - d["prefetch_hits"]) / max(1, d["hits"] + d["misses"]),
            "store_hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),
            "prefetch_hits": d["prefetch_hits"],
            "bytes_read_per_token": d["bytes_read"] / n,
            "disk_bytes_per_token": (io1 - io0) / n,
            "stall_share": d["stall_seconds"] / decode_s,
            "stall_s_per_token": d["stall_seconds"] / n,
            "peak_rss_growth": _peak_rss() - base,
            "tokens": tokens,
        }
    finally:
        m.close()


def child_llama_cpp(spec: dict) -> dict:
    from offload.testing import llama_cpp_model

    _ready_then_wait()
    _peak_reset()
    base = _rss()
    t0 = time.perf_counter()
    llm = llama_cpp_model(spec["model"], n_ctx=N_CTX, n_threads=spec["threads"], logits_all=False)
    load_s = time.perf_counter() - t0
    try:
        n_vocab = llm.n_vocab()
        t0 = time.perf_counter()
        llm.eval(spec["prompt"])
        prompt_s = time.perf_counter() - t0
        io0 = _read_bytes()
        tokens = []
        t0 = time.perf_counter()
        for _ in range(spec["decode"]):
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # logits_all=False: the last row
            tok = int(np.argmax(last))
            tokens.append(tok)
            llm.eval([tok])
            if time.perf_counter() - t0 > spec["max_seconds"]:
                break
        decode_s = time.perf_counter() - t0
        n = len(tokens)
        return {
            "engine": "llama.cpp", "budget": spec["budget"], "load_s": load_s, "prompt_s": prompt_s,
            "decode_tokens": n, "decode_s": decode_s, "decode_tok_s": n / decode_s,
            "disk_bytes_per_token": (_read_bytes() - io0) / n,
            "peak_rss_growth": _peak_rss() - base,
            "tokens": tokens,
        }
    finally:
        llm.close()


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = child_offload(spec) if spec["engine"] == "offload" else child_llama_cpp(spec)
    print("RESULT " + json.dumps(result), flush=True)


# -- the report -------------------------------------------------------------------------

def plot(rows: list[dict], file_size: int, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = [r["budget"] / 2**20 for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(x, [r["offload"].get("decode_tok_s") for r in rows], marker="o", label="offload (O_DIRECT)")
    if any(r.get("llama_cpp") for r in rows):
        ax.plot(x, [(r.get("llama_cpp") or {}).get("decode_tok_s") for r in rows], marker="s",
                label="llama.cpp (mmap, cgroup cap)")
    ax.plot(x, [r["bound_tok_s"] for r in rows], ls="--", color="gray", label="bound: compute + missed bytes / disk")
    ax.axvline(file_size / 2 / 2**20, color="red", alpha=0.3, lw=6, label="50% of the model file")
    ax.axvline(file_size / 2**20, color="black", alpha=0.3, ls=":", label="the model file")
    ax.set_yscale("log")
    ax.set_xlabel("memory budget = cgroup cap (MiB)")
    ax.set_ylabel("decode tok/s")
    ax.set_title("decode speed, page cache dropped before each run")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax2.plot(x, [r["offload"].get("hit_rate") for r in rows], marker="o", label="hit rate")
    ax2.plot(x, [r["offload"].get("stall_share") for r in rows], marker="o", label="I/O stall share of decode")
    ax2.set_xlabel("memory budget (MiB)")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("offload's expert store")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--skew", type=float, default=4.0, help="router skew of the generated model (0: uniform)")
    ap.add_argument("--budgets", default="min,10%,25%,0.5x,75%,100%")
    ap.add_argument("--policy", default="lrfu", choices=("lrfu", "lru", "lfu"))
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="a run's decode stops after this many seconds (its tok/s counts the tokens done)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run, wait up to S seconds for other work on the machine to stop")
    ap.add_argument("--prefetch-depth", default="1",
                    help="offload's prefetch depth; a list (0,1,2) runs offload once per depth (0: no prefetch)")
    ap.add_argument("--no-prefetch", action="store_true", help="the same as --prefetch-depth 0")
    ap.add_argument("--prefetch-modes", default="auto",
                    help="per depth > 0: auto (decoding tokens prefetch while it measures faster, "
                         "offload.prefetch_gate), always, or both (auto,always)")
    ap.add_argument("--prefetch-margin", type=int, default=None,
                    help="extra experts predicted per layer beyond top-k when close (default: the predictor's, k/2)")
    ap.add_argument("--no-cap-offload", dest="cap_offload", action="store_false",
                    help="offload's cgroup only measures (by default it has the same limit as llama.cpp's)")
    ap.add_argument("--shape", choices=("default", "large"), default="default",
                    help="the generated model: 655 MiB, or issue 20's 2.6 GB (16 layers x 64 experts, top-2)")
    ap.add_argument("--no-belady", dest="belady", action="store_false",
                    help="skip the replay of each row's slots against Belady's optimum")
    a = ap.parse_args()
    if a.child:
        return child_main(a.child)
    # a TERM (or ^C) ends the running child and removes its cgroup on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global WAIT_QUIET_S
    WAIT_QUIET_S = a.wait_quiet

    from offload.tokenizer import Tokenizer

    path = (a.model or default_model(a.skew, a.shape)).resolve()
    warm_model()
    file_size = path.stat().st_size
    plan = make_plan_for(path)
    budgets = budgets_for(path, a.budgets.split(","))
    tok = Tokenizer(path)
    prompt = tok.encode(PROMPT, add_special=True, parse_special=False)
    tok.close()
    root = os.geteuid() == 0
    cg = MemoryCgroup.version() if root else None
    if not root or cg is None:
        print("note: not root or no memory cgroup: llama.cpp runs uncapped and the page cache is not dropped",
              file=sys.stderr)
    print(f"model {path.name}: {file_size / 2**20:.0f} MiB, experts {plan.expert_bytes_total / 2**20:.0f} MiB "
          f"({plan.n_experts} of {plan.pools[0].slot_bytes / 2**10:.0f} KiB), minimum budget "
          f"{plan.minimum / 2**20:.1f} MiB ({file_size / plan.minimum:.1f}x smaller than the file)", file=sys.stderr)

    bandwidth = disk_read_bandwidth(path)
    readahead = read_ahead_kb(path)
    from offload.tokenizer import load_llama_cpp

    llama_build = load_llama_cpp().llama_print_system_info().decode().strip()
    base = {"model": str(path), "prompt": prompt, "decode": a.decode, "threads": a.threads, "policy": a.policy,
            "max_seconds": a.max_seconds, "prefetch_margin": a.prefetch_margin}
    modes = a.prefetch_modes.split(",")
    if any(m not in ("auto", "always") for m in modes):
        sys.exit("--prefetch-modes takes auto and/or always")
    timeout = 3 * a.max_seconds + 120
    full = plan.full
    warm = run_child({**base, "engine": "offload", "budget": full, "repeats": 3, "drop_caches": False}, None,
                     timeout, use_cgroup=False)
    if "error" in warm:
        sys.exit(f"offload at the full budget: {warm['error']}")
    compute_s = 1 / warm["decode_tok_s"]
    print(f"disk read {bandwidth / 1e9:.2f} GB/s (O_DIRECT, 8 MiB blocks); compute {1e3 * compute_s:.1f} ms/token "
          f"(offload, every expert resident, warm)", file=sys.stderr)

    rows = []
    depths = [0] if a.no_prefetch else [int(d) for d in a.prefetch_depth.split(",")]
    settings = [(d, m) for d in depths for m in (modes if d > 0 else ["-"])]
    for (label, budget), (depth, mode) in ((b, s) for b in budgets for s in settings):
        r = {"label": label, "budget": budget, "share_of_file": budget / file_size, "prefetch_depth": depth,
             "prefetch_mode": mode}
        r["offload"] = run_child({**base, "engine": "offload", "budget": budget, "prefetch_depth": depth,
                                  "prefetch_mode": mode}, budget if a.cap_offload else None, timeout,
                                 use_cgroup=cg is not None)
        if not a.no_llama_cpp and (depth, mode) == settings[0]:
            r["llama_cpp"] = run_child({**base, "engine": "llama.cpp", "budget": budget}, budget, timeout,
                                       use_cgroup=cg is not None)
        o, l = r["offload"], r.get("llama_cpp") or {}
        missed = o.get("bytes_read_per_token", 0.0)
        r["bound_tok_s"] = 1 / (compute_s + missed / bandwidth)
        r["ratio"] = o["decode_tok_s"] / l["decode_tok_s"] if "decode_tok_s" in o and "decode_tok_s" in l else None
        rows.append(r)
        print(f"  {label:>5} {budget / 2**20:7.1f} MiB  offload (prefetch depth {depth}, {mode}) "
              f"{o.get('decode_tok_s', float('nan')):6.2f} tok/s, stall {o.get('stall_share', float('nan')):.0%}"
              + (f"  llama.cpp {l.get('decode_tok_s', float('nan')):6.2f} tok/s" if l else "")
              + "".join(f"  [{e['error']}]" for e in (o, l) if "error" in e)
              + "".join(f"  (other work took {e['others_cpu_cores']:.1f} cores during {n})"
                        for n, e in (("offload", o), ("llama.cpp", l)) if e.get("others_cpu_cores", 0) > 0.25),
              file=sys.stderr)

    reference = warm["tokens"]
    if a.belady:
        slots = [r["offload"]["slots"] for r in rows if "slots" in r["offload"]]
        replay = routing_vs_belady(path, prompt, reference, slots, a.policy, a.threads) if slots else {}
        for r in rows:
            r["offload"].update(replay.get(r["offload"].get("slots"), {}))
    for r in rows:
        for e in ("offload", "llama_cpp"):
            res = r.get(e) or {}
            if "tokens" in res:
                res["same_tokens"] = res["tokens"] == reference[: len(res["tokens"])]

    def cell(d: dict, key: str, f: str = "{:.2f}", scale: float = 1.0) -> str:
        if key == "decode_tok_s" and "error" in d:
            return d["error"]
        return f.format(d[key] / scale) if d.get(key) is not None else "-"

    table = []
    for r in rows:
        o, l = r["offload"], r.get("llama_cpp") or {}
        pred = o.get("prediction") or {}
        table.append([
            r["label"], f"{r['budget'] / 2**20:.1f}", f"{r['share_of_file']:.0%}",
            f"{r['prefetch_depth']} {r['prefetch_mode']}" if r["prefetch_depth"] else "0",
            cell(o, "prefetch_on_share", "{:.0%}") if r["prefetch_depth"] else "-",
            " ".join(f"{v['recall']:.2f}/{v['precision']:.2f}" for _, v in sorted(pred.items())) or "-",
            cell(o, "prefetch_wasted_per_token", scale=2**20),
            f"{o['slots']}/{o['experts']}" if "slots" in o else "-",
            cell(o, "decode_tok_s"), cell(o, "hit_rate", "{:.3f}"),
            f"{cell(o, 'policy_hit_rate', '{:.3f}')}/{cell(o, 'belady_hit_rate', '{:.3f}')}",
            cell(o, "bytes_read_per_token", scale=2**20),
            cell(o, "stall_share", "{:.0%}"), cell(o, "peak_rss_growth", "{:.0f}", 2**20),
            cell(l, "decode_tok_s"), cell(l, "disk_bytes_per_token", "{:.1f}", 2**20),
            f"{r['bound_tok_s']:.2f}", f"{r['ratio']:.2f}x" if r["ratio"] else "-",
            "/".join(str(x.get("same_tokens", "-")) for x in (o, l) if x),
        ])
    print()
    print_table(["budget", "MiB", "of file", "prefetch depth, mode", "tokens prefetching", "recall/precision d1..", "wasted MiB/tok", "slots", "offload tok/s", "hit rate",
                 f"{a.policy} no prefetch/belady", "MiB read/tok", "stall",
                 "RSS +MiB", "llama.cpp tok/s", "llama MiB read/tok", "bound tok/s", "offload/llama",
                 "same tokens (off/llama)"], table)
    target = next((r for r in rows if r["label"] == TARGET_BUDGET), None)
    if target and target["ratio"] is not None:
        verdict = "met" if target["ratio"] >= TARGET_RATIO else "NOT met"
        print(f"\ntarget (>= {TARGET_RATIO}x llama.cpp's tok/s at a cap of 50% of the model's size): "
              f"{target['ratio']:.2f}x, {verdict}")
    for label, want in TARGETS.items():  # issue 20's, meant for a 2-4 GB model (--shape large)
        best = max((r["ratio"] for r in rows if r["label"] == label and r["ratio"]), default=None)
        if best is not None:
            print(f"issue 20 target at a {label} cap: >= {want}x llama.cpp; best row {best:.2f}x, "
                  f"{'met' if best >= want else 'NOT met'}" + ("" if file_size >= 2e9 else " (the model is under 2 GB)"))
    dropped = all((r.get(e) or {}).get("caches_dropped", True) for r in rows for e in ("offload", "llama_cpp"))
    capped = "llama.cpp and offload" if a.cap_offload else "llama.cpp"
    print(f"model {path.name}: {file_size / 2**20:.0f} MiB, {file_size / plan.minimum:.1f}x its minimum budget; "
          f"disk {bandwidth / 1e9:.2f} GB/s (readahead {readahead} KiB); compute {1e3 * compute_s:.1f} ms/token; "
          f"{a.threads} threads, {a.decode} greedy decode tokens; page cache "
          f"{'dropped' if dropped else 'NOT dropped'} before each run; "
          + (f"{capped} capped at the budget by a cgroup {cg} memory limit" if cg else "no cgroup cap (not root?)"))
    out = write_json("tiering", {
        "machine": machine(), "model": str(path), "file_bytes": file_size, "expert_bytes": plan.expert_bytes_total,
        "minimum_budget": plan.minimum, "full_budget": plan.full, "n_ctx": N_CTX, "threads": a.threads,
        "decode_tokens": a.decode, "policy": a.policy, "o_direct": True, "prompt": prompt,
        "disk_read_bytes_per_s": bandwidth, "read_ahead_kb": readahead, "llama_cpp_build": llama_build,
        "compute_s_per_token": compute_s, "cgroup": cg, "offload_capped": a.cap_offload, "caches_dropped": dropped,
        "warm_full_budget": warm, "rows": rows,
        "target": {"budget": TARGET_BUDGET, "ratio": target["ratio"] if target else None, "want": TARGET_RATIO},
    })
    png = plot(rows, file_size, OUT_DIR / "tiering.png")
    print(f"wrote {out}" + (f" and {png}" if png else " (no plot: matplotlib is missing; pip install -e .[bench])"))
    if not all((r["offload"].get("same_tokens", True)) for r in rows):
        sys.exit("offload's tokens differ between budgets: a bug in the store")


if __name__ == "__main__":
    main()
