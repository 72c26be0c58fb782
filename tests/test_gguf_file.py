"""offload's own GGUF reader against gguf-py's GGUFReader: the same metadata values and
tensors on real files, opened in milliseconds, and one OffloadError for damaged files."""

from __future__ import annotations

import math
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from offload.errors import CorruptModelError, OffloadError, UnsupportedModelError
from offload.gguf_file import GGUFFile
from offload.testing import TinyConfig, quantize_model, shared_data_dir, vocab_path

VOCABS = ["llama-spm", "phi-3", "qwen2", "llama-bpe", "deepseek-llm"]
MODEL = TinyConfig(n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_expert=4, n_expert_used=2)  # K-quant friendly


def available_vocabs() -> list[Path]:
    out = []
    for name in VOCABS:
        try:
            out.append(vocab_path(name))
        except FileNotFoundError:
            pass
    return out


# -- comparing with GGUFReader -------------------------------------------------------

def assert_same_value(ours, theirs, where: str) -> None:
    assert type(ours) is type(theirs), (where, type(ours), type(theirs))
    if isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        if theirs and all(type(x) is type(theirs[0]) for x in theirs) and all(type(x) is type(theirs[0]) for x in ours):
            if isinstance(theirs[0], float):
                np.testing.assert_array_equal(np.array(ours), np.array(theirs), err_msg=where)
            else:
                assert ours == theirs, where
        else:
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_same_value(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours), where
    else:
        assert ours == theirs, where


def assert_same_as_gguf_reader(path: Path, reader: GGUFReader | None = None) -> GGUFFile:
    reader = reader or GGUFReader(path)
    g = GGUFFile(path)
    assert g.keys() == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in reader.fields.items():
        assert_same_value(g.get(key), field.contents(), key)
    assert g.get("no.such.key", "fallback") == "fallback"
    assert list(g.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        ours = g.tensor(t.name)
        assert ours.ggml_type == t.tensor_type and type(ours.ggml_type) is T
        assert ours.shape == tuple(int(d) for d in t.shape)
        assert ours.offset == t.data_offset and ours.n_bytes == t.n_bytes
        assert ours.n_elements == t.n_elements
        assert ours.data.dtype == t.data.dtype and ours.data.shape == t.data.shape, t.name
        assert ours.data.tobytes() == t.data.tobytes(), t.name
        assert not ours.data.flags.writeable and np.shares_memory(ours.data, g._map)
    return g


@pytest.fixture(scope="module")
def models(model_factory, tmp_path_factory):
    f32 = model_factory(MODEL, "F32")
    out = {"F32": f32, "Q8_0": model_factory(MODEL, "Q8_0")}
    try:
        out["Q4_K_M"] = quantize_model(f32, tmp_path_factory.mktemp("q") / "q4km.gguf", "Q4_K_M")
    except ImportError:  # llama-cpp-python missing: the writer's files still cover the format
        pass
    return out


# GGUFReader takes 2 s (SPM) to 20 s (BPE) on these: it checks three, a plain walk the rest
BY_GGUF_READER = {"ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf", "ggml-vocab-llama-bpe.gguf"}


@pytest.mark.parametrize("path", available_vocabs(), ids=lambda p: p.name)
def test_vocab_files_read_as_gguf_reader_reads_them(path):
    if path.name in BY_GGUF_READER:
        g = assert_same_as_gguf_reader(path)
    else:
        g = GGUFFile(path)
        reference = _plain_walk(path.read_bytes())
        assert g.keys() == list(reference)
        for key, value in reference.items():
            assert_same_value(g.get(key), value, key)
    assert g.tensors == {} and len(g.get("tokenizer.ggml.tokens")) > 30000


def _plain_walk(data: bytes) -> dict:
    """Metadata decoded by the simplest sequential walk (scalars, strings, flat arrays)."""
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    off, out = 24, {}

    def one(vtype: int, off: int):
        if vtype == V.STRING:
            n = struct.unpack_from("<Q", data, off)[0]
            return data[off + 8 : off + 8 + n].decode(), off + 8 + n
        fmt = "<" + _FMT[V(vtype)]
        return struct.unpack_from(fmt, data, off)[0], off + struct.calcsize(fmt)

    for _ in range(n_kv):
        key, off = one(V.STRING, off)
        vtype = struct.unpack_from("<I", data, off)[0]
        off += 4
        if vtype == V.ARRAY:
            etype, count = struct.unpack_from("<IQ", data, off)
            off += 12
            out[key] = []
            for _ in range(count):
                value, off = one(etype, off)
                out[key].append(value)
        else:
            out[key], off = one(vtype, off)
    return out


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_K_M"])
def test_models_read_as_gguf_reader_reads_them(models, kind):
    if kind not in models:
        pytest.skip("llama-cpp-python is needed to quantize")
    g = assert_same_as_gguf_reader(models[kind])
    assert g.architecture == "llama" and g.require("llama.block_count") == MODEL.n_layer
    types = {t.ggml_type for t in g.tensors.values()}
    assert T.F32 in types and (kind == "F32" or len(types) > 1)


def test_every_tensor_type_is_typed_as_gguf_reader_types_it(tmp_path):
    """Plain types element-wise (F32, F16, F64, I8..I64); BF16 and quantized types as bytes
    shaped (..., bytes per row); a custom alignment."""
    rng = np.random.default_rng(0)
    path = tmp_path / "types.gguf"
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_tensor("f32", rng.standard_normal((3, 8)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 3, 8)).astype(np.float16))
    w.add_tensor("f64", rng.standard_normal(5))
    for dt in (np.int8, np.int16, np.int32, np.int64):
        w.add_tensor(np.dtype(dt).name, rng.integers(-100, 100, (4, 6)).astype(dt))
    for qt in (T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K):
        block, size = GGML_QUANT_SIZES[qt]
        n_cols = 256
        raw = rng.integers(0, 256, (2, 3, n_cols // block * size), dtype=np.uint8)
        w.add_tensor(qt.name, raw, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    g = assert_same_as_gguf_reader(path)
    assert g.get("general.alignment") == 64 and all(t.offset % 64 == 0 for t in g.tensors.values())
    assert g.tensor("f32").data.dtype == np.float32 and g.tensor("f32").shape == (8, 3)
    assert g.tensor("BF16").data.dtype == np.uint8 and g.tensor("BF16").data.shape == (2, 3, 512)
    assert g.tensor("Q8_0").data.shape == (2, 3, 272)


# -- hand-built files: every value type and the corner cases of arrays ----------------

def _str(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


_FMT = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
        V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


class Raw(bytes):
    """A value's bytes as they are (for damaged values)."""


def _payload(vtype: V, value) -> bytes:
    """A value without its type (as inside an array); arrays as (element type, [items])."""
    if isinstance(value, Raw):
        return value
    if vtype == V.STRING:
        return _str(value)
    if vtype == V.ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_payload(etype, x) for x in items)
    return struct.pack("<" + _FMT[vtype], value)


def build_gguf(kvs: list[tuple[str | bytes, int, object]],
               tensors: list[tuple[str | bytes, tuple[int, ...], int, bytes]] = (),
               version: int = 3, alignment: int = 32, offsets: list[int] | None = None) -> bytes:
    """A GGUF file from raw parts: tensors as (name, ggml dims, type id, data); `offsets`
    overrides the data offsets the table states (for damaged layouts)."""
    out = bytearray(struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        out += _str(key) + struct.pack("<I", vtype) + _payload(vtype, value)
    offset, blobs = 0, []
    for i, (name, dims, type_id, data) in enumerate(tensors):
        stated = offset if offsets is None else offsets[i]
        out += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, stated)
        blobs.append(data + bytes(-len(data) % alignment))
        offset += len(blobs[-1])
    out += bytes(-len(out) % alignment)
    return bytes(out + b"".join(blobs))


def _all_value_types() -> list[tuple[str, V, object]]:
    rng = np.random.default_rng(1)
    # strings of every awkward kind, more than the reader's fast path needs, and longer than 255 bytes
    lengths = [0, 0, 1, 255, 256, 257, 300, 0, 65536, 70000, 8] + list(rng.integers(0, 40, 3000))
    lengths[100:110] = [0] * 10
    strings = [bytes(rng.integers(1, 128, n, dtype=np.uint8)).decode() for n in lengths]
    strings[5] = "a\x00b\x00\x00\x00\x00\x00\x00\x00\x00c"  # NUL bytes look like length fields
    strings[7] = "é🦙" * 50
    kvs: list[tuple[str, V, object]] = [
        ("u8", V.UINT8, 250), ("i8", V.INT8, -5), ("u16", V.UINT16, 65000), ("i16", V.INT16, -300),
        ("u32", V.UINT32, 2**32 - 1), ("i32", V.INT32, -(2**31)), ("f32", V.FLOAT32, 1e-5),
        ("f32.nan", V.FLOAT32, float("nan")), ("true", V.BOOL, True), ("false", V.BOOL, False),
        ("u64", V.UINT64, 2**64 - 1), ("i64", V.INT64, -(2**63)), ("f64", V.FLOAT64, math.pi),
        ("s", V.STRING, "hello"), ("s.empty", V.STRING, ""), ("s.utf8", V.STRING, "▁llama 🦙"),
        ("a.strings", V.ARRAY, (V.STRING, strings)),
        ("a.strings.small", V.ARRAY, (V.STRING, ["x", "", "yz"])),
        ("a.empty", V.ARRAY, (V.INT32, [])), ("a.empty.strings", V.ARRAY, (V.STRING, [])),
        ("a.nested.empty", V.ARRAY, (V.ARRAY, [])),
        ("a.nested", V.ARRAY, (V.ARRAY, [(V.INT32, [1, 2]), (V.INT32, []), (V.INT32, [3])])),
        ("a.nested.strings", V.ARRAY, (V.ARRAY, [(V.STRING, ["ab", "c"]), (V.STRING, ["d"])])),
        ("a.nested.mixed", V.ARRAY, (V.ARRAY, [(V.INT16, [7]), (V.STRING, ["hi"]), (V.BOOL, [True])])),
        ("a.nested.mixed2", V.ARRAY, (V.ARRAY, [(V.STRING, ["hi"]), (V.UINT8, [65, 66])])),
        ("a.nested.first.empty", V.ARRAY, (V.ARRAY, [(V.STRING, []), (V.STRING, ["x"])])),
        ("a.nested3", V.ARRAY, (V.ARRAY, [(V.ARRAY, [(V.FLOAT64, [0.5]), (V.FLOAT64, [1.5, 2.5])])])),
        ("s.after", V.STRING, "still in step"),
    ]
    for vtype, fmt in _FMT.items():
        if vtype == V.BOOL:
            values = [True, False, True]
        elif fmt in "fd":
            values = list(rng.standard_normal(300))
        else:
            info = np.iinfo(np.dtype("<" + fmt))
            dtype = np.uint64 if fmt == "Q" else np.int64
            values = [int(x) for x in rng.integers(info.min, info.max, 300, dtype=dtype)]
        kvs.append((f"a.{vtype.name.lower()}", V.ARRAY, (vtype, values)))
    return kvs


@pytest.mark.parametrize("version", [2, 3])
def test_every_value_type_and_array_shape(tmp_path, version):
    path = tmp_path / "values.gguf"
    path.write_bytes(build_gguf(_all_value_types(), [("t", (32, 2), int(T.F32), bytes(256))], version=version))
    g = assert_same_as_gguf_reader(path)
    assert g.get("GGUF.version") == version
    assert g.get("s.utf8") == "▁llama 🦙" and g.get("a.nested") == [1, 2, 3]
    assert g.get("a.strings")[7] == "é🦙" * 50 and g.get("s.after") == "still in step"


@pytest.mark.parametrize("seed", range(6))
def test_string_arrays_of_random_lengths(tmp_path, seed):
    """The vocabulary skip (vectorized over windows) lands where a sequential walk does."""
    rng = np.random.default_rng(seed)
    n, cap = [(5000, 4), (5000, 40), (3000, 300), (2000, 3000), (300, 70000), (20000, 20)][seed]
    lengths = rng.integers(0, cap, n)
    lengths[rng.random(n) < 0.05] = 0
    raw = rng.integers(1, 128, int(lengths.sum()), dtype=np.uint8)
    if seed % 2:  # runs of NULs that look like length fields
        raw[rng.random(len(raw)) < 0.7] = 0
    ends = np.cumsum(lengths)
    strings = [raw[e - n : e].tobytes().decode() for e, n in zip(ends.tolist(), lengths.tolist())]
    kvs = [("a", V.ARRAY, (V.STRING, strings)), ("b", V.ARRAY, (V.STRING, strings[::-1])), ("end", V.UINT32, 7)]
    path = tmp_path / "strings.gguf"
    path.write_bytes(build_gguf(kvs))
    g = GGUFFile(path)
    assert g.get("a") == strings and g.get("b") == strings[::-1] and g.get("end") == 7


def test_unreadable_utf8_value_is_reported_when_asked_for(tmp_path):
    path = tmp_path / "utf8.gguf"
    path.write_bytes(build_gguf([("ok", V.UINT8, 1), ("bad", V.STRING, b"\xff\xfe"),
                                 ("bad.array", V.ARRAY, (V.STRING, [b"fine", b"\xc3"]))]))
    g = GGUFFile(path)
    assert g.get("ok") == 1
    for key in ("bad", "bad.array"):
        with pytest.raises(CorruptModelError, match=f"metadata key {key} is unreadable"):
            g.get(key)


# -- speed -------------------------------------------------------------------------------

def _open_time(path: Path) -> float:
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        GGUFFile(path).close()
        best = min(best, time.perf_counter() - start)
    return best


def test_opening_a_large_vocabulary_takes_milliseconds():
    """gguf-py's reader took 17 s on llama-bpe (128k tokens + 280k merges), 1.7 s on llama-spm."""
    path = max(available_vocabs(), key=lambda p: p.stat().st_size)
    assert _open_time(path) < 0.2


def test_opening_a_quantized_model_takes_milliseconds(models):
    assert _open_time(models.get("Q4_K_M", models["Q8_0"])) < 0.2


# -- damaged files -----------------------------------------------------------------------

def _layout(data: bytes) -> tuple[list[tuple[str, int]], int, int]:
    """(length-like fields as (what, offset), end of the metadata, end of the tensor table)
    of a well-formed file, by a plain sequential walk."""
    fields: list[tuple[str, int]] = []
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    fields += [("n_tensors", 8), ("n_kv", 16)]
    off = 24

    def string(off: int, what: str) -> int:
        fields.append((what, off))
        return off + 8 + struct.unpack_from("<Q", data, off)[0]

    def value(vtype: int, off: int, what: str) -> int:
        if vtype == V.STRING:
            return string(off, what)
        if vtype == V.ARRAY:
            etype, count = struct.unpack_from("<IQ", data, off)
            fields.append((what + " type", off))
            fields.append((what + " count", off + 4))
            off += 12
            for i in range(count):
                off = value(etype, off, f"{what}[{i}]") if i < 3 or i == count - 1 or etype != V.STRING else (
                    off + 8 + struct.unpack_from("<Q", data, off)[0])
            return off
        return off + struct.calcsize("<" + _FMT[V(vtype)])

    for _ in range(n_kv):
        off = string(off, "key")
        fields.append(("value type", off))
        off = value(struct.unpack_from("<I", data, off)[0], off + 4, "value")
    meta_end = off
    for _ in range(n_tensors):
        off = string(off, "tensor name")
        fields.append(("n_dims", off))
        n_dims = struct.unpack_from("<I", data, off)[0]
        fields += [("dim", off + 4 + 8 * i) for i in range(n_dims)]
        off += 4 + 8 * n_dims
        fields += [("tensor type", off), ("tensor offset", off + 4)]
        off += 12
    return fields, meta_end, off


def _must_fail(path: Path, what: str) -> OffloadError:
    start = time.perf_counter()
    try:
        GGUFFile(path)
    except OffloadError as e:
        e = e.with_traceback(None)  # let the failed file's memory map go
        assert isinstance(e, (CorruptModelError, UnsupportedModelError)), (what, e)
        assert str(path) in str(e) and "\n" not in str(e)
        assert time.perf_counter() - start < 2.0, what
        return e
    except Exception as e:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"{what}: {type(e).__name__}: {e}")
    pytest.fail(f"{what}: opened without an error")


@pytest.mark.parametrize("source", ["vocab", "model"])
def test_truncated_anywhere_before_the_data_is_one_clear_error(models, tmp_path, source):
    src = vocab_path("llama-spm") if source == "vocab" else models["Q8_0"]
    data = src.read_bytes()
    fields, meta_end, table_end = _layout(data)
    rng = np.random.default_rng(2)
    cuts = set(range(0, 80)) | {o + d for _, o in fields for d in (0, 1, 4, 7, 8, 9)}
    cuts |= set(rng.integers(0, table_end, 400).tolist())
    cuts = sorted((c for c in cuts if c < table_end), reverse=True)
    g = GGUFFile(src)
    if g.tensors:  # and inside the tensor data, short of the last tensor's end
        data_end = max(t.offset + t.n_bytes for t in g.tensors.values())
        first = min(t.offset for t in g.tensors.values())
        cuts = sorted(set(rng.integers(first, data_end, 50).tolist()), reverse=True) + cuts
    del g
    path = tmp_path / "cut.gguf"
    shutil.copyfile(src, path)
    start = time.perf_counter()
    for cut in cuts:  # shrink one file step by step: no copy per cut
        os.truncate(path, cut)
        e = _must_fail(path, f"cut at {cut}")
        assert isinstance(e, CorruptModelError), (cut, e)
    assert time.perf_counter() - start < 60


U64_VALUES = [2**64 - 1, 2**63, 2**62 + 5, 2**32, None]  # None: just past what is left in the file
TYPE_VALUES = [2**32 - 1, 2**31, 13, 2**16, 200]  # value types end at 12
QUANT_TYPE_VALUES = [2**32 - 1, 2**31, 99, 4, 1000]  # 4 and 5 were Q4_2, Q4_3: gone


@pytest.mark.parametrize("source", ["vocab", "model"])
def test_absurd_length_fields_are_one_clear_error(models, tmp_path, source):
    src = vocab_path("llama-spm") if source == "vocab" else models["Q8_0"]
    data = src.read_bytes()
    fields, _, _ = _layout(data)
    path = tmp_path / "huge.gguf"
    shutil.copyfile(src, path)
    checked = 0
    with open(path, "r+b") as f:
        for what, offset in fields:
            if what == "tensor type":
                patches = [struct.pack("<I", v) for v in QUANT_TYPE_VALUES]
            elif what.endswith("type") or what == "n_dims":
                patches = [struct.pack("<I", v) for v in TYPE_VALUES]
            else:
                patches = [struct.pack("<Q", len(data) - offset if v is None else v) for v in U64_VALUES]
            for patch in patches:
                f.seek(offset); f.write(patch); f.flush()
                _must_fail(path, f"{what} at {offset} = {patch.hex()}")
                f.seek(offset); f.write(data[offset : offset + len(patch)]); f.flush()
                checked += 1
    assert checked > 100


def test_unknown_quant_type_id_names_the_id(models, tmp_path):
    data = bytearray(models["Q8_0"].read_bytes())
    fields, _, _ = _layout(bytes(data))
    offset = next(o for what, o in fields if what == "tensor type")
    data[offset : offset + 4] = struct.pack("<I", 99)
    path = tmp_path / "q99.gguf"
    path.write_bytes(bytes(data))
    e = _must_fail(path, "type 99")
    assert isinstance(e, UnsupportedModelError) and "unknown quant type id 99" in str(e)


def test_other_damage_is_one_clear_error(tmp_path):
    path = tmp_path / "d.gguf"
    f32 = [("t", (32, 2), int(T.F32), bytes(256))]
    two = [("a", (32, 2), int(T.F32), bytes(256)), ("b", (32, 2), int(T.F32), bytes(256))]
    cases = {
        "bad magic": (b"GGUX" + bytes(40), "bad magic"),
        "short header": (build_gguf([])[:20], "truncated GGUF header"),
        "version 4": (build_gguf([], version=4), "version 4"),
        "absurd counts": (struct.pack("<IIQQ", 0x46554747, 3, 2**40, 2**40) + bytes(100), "more than"),
        "unknown value type": (build_gguf([("k", 13, Raw(b"\x01"))]), "unknown value type 13"),
        "array of unknown type": (build_gguf([("k", V.ARRAY, Raw(struct.pack("<IQ", 77, 1) + b"\x01"))]),
                                  "unknown value type 77"),
        "duplicate key": (build_gguf([("k", V.UINT8, 1), ("k", V.UINT8, 2)]), "duplicate metadata key k"),
        "duplicate tensor": (build_gguf([], f32 + f32), "duplicate tensor t"),
        "key not utf-8": (build_gguf([(b"\xff", V.UINT8, 1)]), "not UTF-8"),
        "tensor name not utf-8": (build_gguf([], [(b"\xff", (32,), int(T.F32), bytes(128))]), "not UTF-8"),
        "alignment type": (build_gguf([("general.alignment", V.UINT64, 32)], f32), "general.alignment"),
        "alignment not a power of two": (build_gguf([("general.alignment", V.UINT32, 24)], f32), "power of two"),
        "rows not whole blocks": (build_gguf([], [("q", (48, 2), int(T.Q8_0), bytes(128))]), "block size 32"),
        "no dims": (build_gguf([], [("t", (), int(T.F32), bytes(4))]), "0 dimensions"),
        "five dims": (build_gguf([], [("t", (1, 1, 1, 1, 1), int(T.F32), bytes(4))]), "5 dimensions"),
        "data past the end": (build_gguf([], f32)[:-64], "truncated"),
        "overlapping tensors": (build_gguf([], two, offsets=[0, 128]), "expected 256"),
        "misaligned tensor": (build_gguf([], two, offsets=[0, 260]), "expected 256"),
        "a gap between tensors": (build_gguf([], two, offsets=[0, 512]), "expected 256"),
        "first tensor not at the start": (build_gguf([], f32, offsets=[32]), "expected 0"),
        "dims whose product overflows": (build_gguf([], [("t", (2**32, 2**32, 2**32, 2**32), int(T.F32), b"")]),
                                         "truncated"),
        "alignment 0": (build_gguf([("general.alignment", V.UINT32, 0)], f32), "power of two"),
        "a type id from the future": (build_gguf([], [("t", (32,), 2**20, bytes(128))]), "unknown quant type id"),
    }
    deep = bytearray(struct.pack("<IIQQ", 0x46554747, 3, 0, 1) + _str("k") + struct.pack("<I", V.ARRAY))
    deep += struct.pack("<IQ", V.ARRAY, 1) * 5000 + struct.pack("<IQ", V.UINT8, 0)
    cases["nested 5000 deep"] = (bytes(deep), "nested more than")
    for name, (raw, fragment) in cases.items():
        path.write_bytes(raw)
        assert fragment in str(_must_fail(path, name)), name
    path.write_bytes(b"GGU")
    assert "is not a GGUF file (bad magic)" in str(_must_fail(path, "3 bytes"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(OffloadError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(OffloadError, match="is a directory"):
        GGUFFile(tmp_path)


def test_close_and_missing_tensor(models):
    g = GGUFFile(models["Q8_0"])
    assert g.file_size == models["Q8_0"].stat().st_size and g.path == models["Q8_0"]
    with pytest.raises(UnsupportedModelError, match="tensor nope is missing"):
        g.tensor("nope")
    with pytest.raises(UnsupportedModelError, match="required metadata key nope is missing"):
        g.require("nope")
    view = g.tensor("token_embd.weight").data
    g.close()
    assert g.tensors == {} and view.sum() is not None  # views outlive close()
