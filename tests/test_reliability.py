"""Reliability: hostile metadata and vocabularies, damaged weights, a file changed under a
running model, two threads on one Model, memory limits from the cgroup, atomic writes, and
a long run under a tight budget.

The rule everywhere: a one-line OffloadError (the CLI's exit code 1), never a traceback,
a crash of the process (llama.cpp aborts on some vocabularies) or silent garbage.
(The GGUF reader's own damage cases are in test_gguf_file.py.)
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload import Model
from offload.atomic import atomic_write
from offload.errors import (BudgetError, CorruptModelError, ModelBusyError, ModelFileChangedError, NonFiniteError,
                            OffloadError, UnsupportedModelError)
from offload.gguf_file import GGUFFile
from offload.store import budget
from offload.testing import TinyConfig, make_memory_cgroup, rewrite_gguf, write_model
from offload.tokenizer import bytes_without_token

# A small SentencePiece vocabulary (control tokens, the 256 byte tokens, a few words): a
# model with it rewrites and loads in milliseconds, so the fuzz below can run many cases.
_SMALL_VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁the", "▁a", "▁and", "e", "t"]
_SMALL_VOCAB_KEYS = {
    "tokenizer.ggml.tokens": (_SMALL_VOCAB, V.ARRAY, V.STRING),
    "tokenizer.ggml.scores": ([0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0], V.ARRAY, V.FLOAT32),
    "tokenizer.ggml.token_type": ([2, 3, 3] + [6] * 256 + [1] * 5, V.ARRAY, V.INT32),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A tiny llama-MoE with the small vocabulary (its embedding keeps 32000 rows: padded)."""
    root = tmp_path_factory.mktemp("reliability")
    return rewrite_gguf(write_model(root / "big-vocab.gguf", TinyConfig(), "F32"), root / "small.gguf",
                        _SMALL_VOCAB_KEYS)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# -- hostile metadata: fuzzed --------------------------------------------------------------

_HYPERPARAMETERS = ["llama.context_length", "llama.embedding_length", "llama.block_count",
                    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                    "llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count",
                    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.expert_count",
                    "llama.expert_used_count", "llama.vocab_size", "general.architecture", "tokenizer.ggml.model",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.tokens",
                    "tokenizer.ggml.scores", "tokenizer.ggml.add_bos_token", "llama.rope.scaling.type"]
_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 7, 15, 16, 17, 64, 2**16, 2**31 - 1, 2**32 - 1]).map(lambda v: (v, V.UINT32)),
    st.sampled_from([-1, -100, -2**31]).map(lambda v: (v, V.INT32)),
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e38, 1e-45]).map(lambda v: (v, V.FLOAT32)),
    st.sampled_from(["", "llama", "gpt2", "none", "qwen3moe", "deepseek2", "yarn", "x" * 300]).map(lambda v: (v, V.STRING)),
    st.sampled_from([[], [1, 2], ["a"], ["<s>"] * 3]).map(lambda v: (v, V.ARRAY)),
    st.just(None),  # the key removed
)


@settings(max_examples=int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_HYPERPARAMETERS), _VALUES, min_size=1, max_size=3))
def test_hostile_metadata_loads_or_is_one_clear_error(small, tmp_path_factory, changes):
    """Any mix of wrong, missing, zero, huge, negative, NaN or mistyped hyperparameters and
    vocabulary fields: the model loads and computes finite logits, or refuses in one line.
    (bench/fuzz.py runs the same with more cases and more keys.)"""
    path = tmp_path_factory.getbasetemp() / "hostile.gguf"
    try:
        rewrite_gguf(small, path, changes)
    except (ValueError, TypeError, OverflowError):
        return  # gguf-py cannot write this value (e.g. a list of mixed types): no file to test
    try:
        with Model.load(path, n_ctx=64) as m:
            ids = m.tokenize("the end")
            logits = m.logits(ids[: m.n_ctx])
            assert np.isfinite(logits).all()
            m.detokenize([int(np.argmax(logits[-1]))])
    except OffloadError as e:
        _one_line(e)


def test_hyperparameters_that_do_not_fit_the_tensors_name_the_tensor(small, tmp_path):
    cases = {"llama.attention.head_count": ((8, V.UINT32), "blk.0.attn_q"),
             "llama.embedding_length": ((128, V.UINT32), "token_embd"),
             "llama.expert_count": ((8, V.UINT32), "holds 4 experts"),
             # bench/fuzz.py found these: a loop over 2^31 layers (a hang), a negative count
             "llama.block_count": ((2**31 - 1, V.UINT32), "block_count is 2147483647 but the file holds tensors for 2"),
             "llama.expert_used_count": ((-1, V.INT32), "expert counts 4 / -1"),
             "llama.feed_forward_length": ((7, V.UINT32), None)}  # unused by a MoE layer: still loads
    for key, (value, fragment) in cases.items():
        path = rewrite_gguf(small, tmp_path / "m.gguf", {key: value})
        if fragment is None:
            Model.load(path).close()
            continue
        with pytest.raises(UnsupportedModelError) as e:
            Model.load(path)
        assert fragment in _one_line(e.value), key


# -- vocabularies llama.cpp would crash on -------------------------------------------------

def test_text_needing_a_missing_byte_token_is_refused_not_an_abort(small, tmp_path):
    tokens = [t for t in _SMALL_VOCAB if t != "<0xC3>"]  # no token for é's first byte
    keys = {"tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": ([0.0] * len(tokens), V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": ([1] * len(tokens), V.ARRAY, V.INT32)}
    with Model.load(rewrite_gguf(small, tmp_path / "m.gguf", keys)) as m:
        assert m.tokenize("the end")  # text that does not need it works
        with pytest.raises(CorruptModelError, match="no token for byte 0xC3"):
            m.tokenize("café")
    assert bytes_without_token("llama", tokens) == {0xC3}
    assert bytes_without_token("llama", _SMALL_VOCAB) == frozenset()


@pytest.mark.parametrize("keys, fragment", [
    ({"tokenizer.ggml.scores": ([0.0] * 5, V.ARRAY, V.FLOAT32)}, "one value per token"),
    ({"tokenizer.ggml.model": ("none", V.STRING)}, "no tokenizer"),
    # bench/fuzz.py found it: llama.cpp aborts the process on a repeated token text
    ({"tokenizer.ggml.tokens": (_SMALL_VOCAB[:-1] + ["▁the"], V.ARRAY, V.STRING)}, "same token text twice"),
    ({"tokenizer.ggml.tokens": (5, V.UINT32)}, "not a list of token texts"),
])
def test_damaged_vocabularies_are_one_clear_error(small, tmp_path, keys, fragment):
    with pytest.raises(OffloadError) as e:
        Model.load(rewrite_gguf(small, tmp_path / "m.gguf", keys))
    assert fragment in _one_line(e.value)


def test_tokens_past_the_vocabulary_detokenize_to_nothing(small):
    """The embedding has 32000 rows, the vocabulary 264 tokens: a sampled padding row must not
    reach llama.cpp's token table (it would abort)."""
    with Model.load(small) as m:
        assert m.tokenizer.n_vocab == len(_SMALL_VOCAB) < m.args.n_vocab
        assert m.detokenize([m.args.n_vocab - 1, 300]) == ""
        out = "".join(m.generate([1, 260], max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3))
        assert isinstance(out, str)


# -- damaged weights: NaN and Inf ----------------------------------------------------------

def test_nan_weights_name_the_layer(small, tmp_path):
    path = tmp_path / "nan.gguf"
    path.write_bytes(small.read_bytes())
    g = GGUFFile(path)
    t = g.tensor("blk.1.attn_output.weight")
    offset = t.offset
    g.close()
    with open(path, "r+b") as f:  # one NaN in layer 1's attention output
        f.seek(offset)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    with Model.load(path) as m:
        with pytest.raises(NonFiniteError, match="layer 1 produced NaN or Inf"):
            m.logits([1, 260, 261])
        with pytest.raises(NonFiniteError):  # the next call too: a clear error each time, no crash
            list(m.generate([1, 260], max_tokens=2))


# -- the file changed under a running model ------------------------------------------------

@pytest.mark.parametrize("change", ["truncate", "replace", "rewrite"])
def test_file_changed_under_a_running_model_is_one_clear_error(small, tmp_path, change):
    path = tmp_path / "live.gguf"
    path.write_bytes(small.read_bytes())
    with Model.load(small) as probe:
        minimum = probe.plan.minimum
    with Model.load(path, memory_budget=minimum) as m:  # experts read from the file
        before = m.logits([1, 260, 261])
        assert m.store_stats()["misses"] > 0  # experts came from the file
        if change == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        elif change == "replace":
            os.replace(_copy(small, tmp_path / "other.gguf"), path)  # the same bytes, another file
        else:
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(ModelFileChangedError) as e:
            list(m.generate_tokens([1, 260], 3, _greedy()))
        assert str(path) in _one_line(e.value)
        with pytest.raises(ModelFileChangedError):  # each time, no crash
            m.logits([1, 260, 261])
    with Model.load(small, memory_budget=minimum) as fresh:  # what the process can still do
        assert np.array_equal(fresh.logits([1, 260, 261]), before)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


# -- one Model, two threads ------------------------------------------------------------------

def test_a_second_thread_gets_a_clear_error_while_the_first_generates(small):
    with Model.load(small) as m:
        first = m.generate_tokens([1, 260], 20, _greedy())
        head = next(first)  # thread 1 is mid-generation
        errors = []

        def other():
            try:
                m.logits([1, 261])
            except ModelBusyError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "another thread" in _one_line(errors[0])
        rest = list(first)  # the first generation is undisturbed
        assert [head, *rest] == list(m.generate_tokens([1, 260], 20, _greedy()))

        result = []
        t = threading.Thread(target=lambda: result.append(m.logits([1, 261])))  # free again: works
        t.start()
        t.join()
        assert len(result) == 1


def _greedy():
    from offload.sampling import SamplingParams

    return SamplingParams(temperature=0.0)


# -- memory limits -------------------------------------------------------------------------

def _cgroup(tmp_path: Path, version: int, limit: str, usage: int, depth: str = "user.slice/app") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc-self-cgroup"
    if version == 2:
        group = root / depth
        group.mkdir(parents=True)
        (group / "memory.max").write_text(limit + "\n")
        (group / "memory.current").write_text(f"{usage}\n")
        (root / "memory.max").write_text("max\n")
        proc.write_text(f"0::/{depth}\n")
    else:
        group = root / "memory" / depth
        group.mkdir(parents=True)
        (group / "memory.limit_in_bytes").write_text(limit + "\n")
        (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
        proc.write_text(f"12:pids:/{depth}\n4:memory:/{depth}\n0::/\n")
    return root, proc


@pytest.mark.parametrize("version", [1, 2])
def test_the_cgroup_memory_limit_is_found(tmp_path, version):
    root, proc = _cgroup(tmp_path, version, str(512 << 20), 100 << 20)
    limit, usage, source = budget.cgroup_limit(root, proc)
    assert (limit, usage) == (512 << 20, 100 << 20) and source.startswith(str(root))


@pytest.mark.parametrize("version", [1, 2])
def test_no_limit_reads_as_none(tmp_path, version):
    root, proc = _cgroup(tmp_path, version, "max" if version == 2 else str(2**63 - 4096), 0)
    assert budget.cgroup_limit(root, proc) is None
    assert budget.cgroup_limit(root, tmp_path / "missing") is None


def test_a_parent_groups_limit_counts(tmp_path):
    root, proc = _cgroup(tmp_path, 2, "max", 1 << 20, depth="box/inner")
    (root / "box" / "memory.max").write_text(str(300 << 20))
    (root / "box" / "memory.current").write_text(str(50 << 20))
    assert budget.cgroup_limit(root, proc)[:2] == (300 << 20, 50 << 20)


def test_budgets_follow_the_cgroup_limit(monkeypatch, small):
    monkeypatch.setattr(budget, "cgroup_limit", lambda *a: (400 << 20, 100 << 20, "/sys/fs/cgroup/memory.max"))
    mem = budget.memory()
    assert mem.total == 400 << 20 and mem.available <= 300 << 20
    share, why = budget.default_budget()
    assert share <= int(0.75 * (300 << 20)) and "cgroup" in why
    assert budget.parse_budget("50%") == 200 << 20
    with pytest.raises(BudgetError) as e:
        Model.load(small, memory_budget="1GiB")
    assert "above this process's memory limit of 400 MiB" in _one_line(e.value)


# -- files written whole or not at all -----------------------------------------------------

def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_trace_to_a_read_only_folder_is_one_clear_error(small, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with Model.load(small) as m, pytest.raises(OffloadError) as e:
            list(m.generate([1, 260], max_tokens=2, record_trace=folder / "t.npz"))
        _one_line(e.value)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


def test_a_trace_that_cannot_be_written_leaves_no_partial_file(small, tmp_path, monkeypatch):
    """A full disk in the middle of the write: no file (and no temporary) remains."""
    import offload.trace as trace

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 part of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trace.np, "savez_compressed", full_disk)
    with Model.load(small) as m, pytest.raises(OffloadError, match="No space left") as e:
        list(m.generate([1, 260], max_tokens=2, record_trace=tmp_path / "t.npz"))
    _one_line(e.value)
    assert os.listdir(tmp_path) == []


# -- a long run under a tight budget -------------------------------------------------------

def test_a_long_run_under_a_tight_budget_is_identical_and_does_not_grow():
    """The demo model decodes the same 1500 greedy tokens (past its end-of-text tokens) from the
    file under its minimum budget with prefetch as with everything resident, and the process
    does not grow while it decodes (no per-token leak)."""
    import psutil

    from offload.demo import demo_model_path

    n, path = 1500, demo_model_path()
    with Model.load(path, n_ctx=2048) as m:
        alone = _greedy_steps(m, n)
        minimum = m.plan.minimum
    with Model.load(path, n_ctx=2048, memory_budget=minimum, prefetch=True) as m:
        assert m.experts.__class__.__name__ == "TieredExperts" and not m.experts.all_resident
        rss = []
        tokens = _greedy_steps(m, n, on_step=lambda i: rss.append(psutil.Process().memory_info().rss)
                               if i in (300, n - 1) else None)
        assert m.store_stats()["misses"] > 0
        kv_pages = m.transformer.cache.nbytes * (n - 300) // m.n_ctx  # the cache's rows are touched as they fill
    assert tokens == alone
    grown = rss[1] - rss[0] - kv_pages
    assert grown < 2 << 20, f"RSS grew {grown / 2**20:.1f} MiB beyond the KV cache's rows over {n - 300} tokens"


def _greedy_steps(m: Model, n: int, on_step=lambda i: None) -> list[int]:
    """n greedy decode steps after a BOS, through end-of-text tokens (a chat would stop there)."""
    m.transformer.reset()
    token, out = 1, []
    for i in range(n):
        token = int(np.argmax(m.transformer.forward(np.array([token]))[-1]))
        out.append(token)
        on_step(i)
    return out


# -- the tokenizer's inputs and the trace reader, fuzzed -----------------------------------

@pytest.fixture(scope="module")
def spm_model(small):
    m = Model.load(small)
    yield m
    m.close()


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(exclude_categories=()), max_size=200))  # surrogates too
def test_any_text_tokenizes_and_detokenizes(spm_model, text):
    """Any Python string (control characters, NUL, lone surrogates as a JSON body may carry,
    private-use and astral characters): token ids inside the vocabulary, and text back."""
    ids = spm_model.tokenize(text)
    assert all(0 <= i < spm_model.tokenizer.n_vocab for i in ids)
    assert isinstance(spm_model.detokenize(ids), str)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_routing_traces_are_one_clear_error(small, tmp_path_factory, data):
    from offload.trace import RoutingTrace

    folder = tmp_path_factory.getbasetemp()
    good = folder / "good-trace.npz"
    if not good.exists():
        with Model.load(small) as m:
            list(m.generate([1, 260], max_tokens=4, record_trace=good, seed=1))
    raw = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "junk"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=16)):
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=2048)))
    bad = folder / "bad-trace.npz"
    bad.write_bytes(bytes(raw))
    try:
        trace = RoutingTrace.load(bad)
    except OffloadError as e:
        _one_line(e)
    else:  # a flip in a stored checksum-free field can leave a valid trace: it must be consistent
        assert trace.experts.shape == trace.weights.shape


def test_a_run_in_a_memory_cgroup_takes_its_budget_from_the_limit(tmp_path):
    """A process in a 400 MiB cgroup loads the demo with no budget given: the plan's budget
    comes from the cgroup (psutil would say the host's RAM), the run completes, and the
    group's peak stays under its limit (no OOM kill)."""
    import subprocess
    import sys

    limit = 400 << 20
    group = make_memory_cgroup(limit, "offload-test")
    if group is None:
        pytest.skip("cannot make a memory cgroup here")
    try:
        run = ("from offload import Model; from offload.demo import demo_model_path\n"
               "with Model.load(demo_model_path()) as m:\n"
               "    print(m.plan.budget, m.plan.budget_source)\n"
               "    print(m.generate('In the beginning', max_tokens=24, temperature=0, stream=False))\n")
        enter = f"echo $$ > {group}/cgroup.procs && exec \"$@\""
        r = subprocess.run(["sh", "-c", enter, "sh", sys.executable, "-c", run], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        budget_line, text = r.stdout.split("\n", 1)
        assert int(budget_line.split()[0]) < limit and "cgroup limit" in budget_line, budget_line
        assert text.strip()
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        assert peak < limit
    finally:
        for _ in range(50):  # the group empties when the child has gone
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
