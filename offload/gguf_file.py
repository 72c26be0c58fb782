"""A GGUF file: metadata, the tensor table, and memory-mapped tensor data.

The GGUF layout (versions 2 and 3, little-endian) is read here directly rather than
with gguf-py's `GGUFReader`, which builds a numpy view for every element of every
metadata array: seconds for a 32k vocabulary, tens of seconds for a 150k one. Opening
a file here decodes scalars and strings, only records where each array lies (element
type, count, byte offset), and decodes an array when `get()` asks for it. Every length
read from the file is checked against the bytes left before it is used, so a damaged
file becomes one clear `OffloadError` (never a hang, a huge allocation or a traceback
deep inside numpy). Tensor records keep the data in its GGUF encoding: a read-only view
into one memory map of the file, nothing copied or dequantized.

    file    := magic u32 | version u32 | n_tensors u64 | n_kv u64 | kv* | tensor_info* | pad | data
    kv      := key:string | type u32 | value
    value   := scalar | string | array
    string  := length u64 | utf-8 bytes
    array   := element type u32 | count u64 | value*       (arrays of arrays allowed)
    tensor_info := name:string | n_dims u32 | dims u64[n_dims] | ggml type u32 | offset u64
    data starts at the first multiple of general.alignment (default 32) after the table.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC, GGUFValueType

from .errors import CorruptModelError, ModelFileChangedError, OffloadError, UnsupportedModelError

_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor_count, kv_count
_MIN_KV_BYTES = 8 + 4  # a key's length prefix + the value type: a lower bound per entry
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 16  # arrays of arrays of ...: real files nest at most once

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEADER = struct.Struct("<IQ")  # element type, count

_T = GGUFValueType
_STRING, _ARRAY = int(_T.STRING), int(_T.ARRAY)
# value type -> (struct of one value, numpy dtype of an array of them)
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    int(t): (struct.Struct("<" + fmt), np.dtype(dt))
    for t, fmt, dt in [
        (_T.UINT8, "B", "<u1"), (_T.INT8, "b", "<i1"), (_T.UINT16, "H", "<u2"), (_T.INT16, "h", "<i2"),
        (_T.UINT32, "I", "<u4"), (_T.INT32, "i", "<i4"), (_T.FLOAT32, "f", "<f4"), (_T.BOOL, "?", "?"),
        (_T.UINT64, "Q", "<u8"), (_T.INT64, "q", "<i8"), (_T.FLOAT64, "d", "<f8"),
    ]
}
# element sizes, for bounding a count by the bytes left (a string is at least its length field)
_MIN_SIZE = {**{t: s.size for t, (s, _) in _SCALARS.items()}, _STRING: 8, _ARRAY: _ARRAY_HEADER.size}

# how gguf-py types tensor data: these element-wise, every other type as raw bytes
_Q = GGMLQuantizationType
_PLAIN_DTYPES = {_Q.F32: np.float32, _Q.F16: np.float16, _Q.F64: np.float64, _Q.I8: np.int8,
                 _Q.I16: np.int16, _Q.I32: np.int32, _Q.I64: np.int64}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is in ggml order: shape[0] is the row length."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_bytes: int
    offset: int  # absolute offset of the data in the file
    data: np.ndarray  # read-only view into the memory map, as the gguf reader types it

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclass(frozen=True)
class _LazyArray:
    """Where a metadata array lies: decoded only when asked for."""

    element_type: int
    count: int
    offset: int  # of the first element


@dataclass(frozen=True)
class _Unreadable:
    """A metadata value that could not be decoded (bad UTF-8): an error when asked for."""

    reason: str


class _Damaged(Exception):
    """Internal: the bytes do not parse; becomes a CorruptModelError naming the file."""


class GGUFFile:
    """An opened GGUF file. Metadata arrays are decoded lazily (vocabularies are large)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file_size = _check_header(self.path)
        self._identity = _identity(os.stat(self.path))
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._bytes = self._map.view(np.ndarray)  # the same memory; slicing it skips memmap's overhead
        self._buf = memoryview(self._map)
        self._values: dict[str, Any] = {}  # key -> decoded value, _LazyArray or _Unreadable
        self._types: dict[str, int] = {}  # key -> GGUF value type
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except _Damaged as e:
            raise CorruptModelError(f"{self.path}: corrupt or truncated GGUF ({e})") from None
        except (struct.error, ValueError, IndexError, OverflowError, MemoryError, RecursionError) as e:
            # bytes that got past a check we lack: still one line, not a traceback
            raise CorruptModelError(
                f"{self.path}: corrupt or truncated GGUF ({type(e).__name__}: {e})"
            ) from None

    # -- parsing ----------------------------------------------------------------------
    def _need(self, offset: int, n: int, what: str) -> None:
        if offset + n > self.file_size:
            raise _Damaged(f"{what} at byte {offset} needs {n} bytes, but the file ends at {self.file_size}")

    def _u32(self, offset: int, what: str) -> int:
        self._need(offset, 4, what)
        return _U32.unpack_from(self._buf, offset)[0]

    def _u64(self, offset: int, what: str) -> int:
        self._need(offset, 8, what)
        return _U64.unpack_from(self._buf, offset)[0]

    def _string(self, offset: int, what: str) -> tuple[bytes, int]:
        """The raw bytes of the string at `offset`, and the offset after it."""
        n = self._u64(offset, what + " length")
        self._need(offset + 8, n, what)
        return bytes(self._buf[offset + 8 : offset + 8 + n]), offset + 8 + n

    def _parse(self) -> None:
        _, version, n_tensors, n_kv = _HEADER.unpack_from(self._buf, 0)
        self._values.update({"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv})
        offset = _HEADER.size
        for _ in range(n_kv):
            raw_key, offset = self._string(offset, "metadata key")
            key = _utf8(raw_key, f"metadata key at byte {offset - len(raw_key)}")
            if key in self._values:
                raise _Damaged(f"duplicate metadata key {key}")
            vtype = self._types[key] = self._u32(offset, f"type of {key}")
            self._values[key], offset = self._read_value(vtype, offset + 4, key)

        infos = []
        for _ in range(n_tensors):
            raw_name, offset = self._string(offset, "tensor name")
            name = _utf8(raw_name, f"tensor name at byte {offset - len(raw_name)}")
            n_dims = self._u32(offset, f"n_dims of tensor {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise _Damaged(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS})")
            self._need(offset + 4, 8 * n_dims + 12, f"tensor info of {name}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._buf, offset + 4)
            offset += 4 + 8 * n_dims
            type_id, rel_offset = struct.unpack_from("<IQ", self._buf, offset)
            offset += 12
            infos.append((name, dims, type_id, rel_offset))

        alignment = _DEFAULT_ALIGNMENT
        if "general.alignment" in self._values:
            alignment = self._values["general.alignment"]
            if self._types["general.alignment"] != int(_T.UINT32):
                raise _Damaged("bad type for general.alignment (must be uint32)")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Damaged(f"general.alignment {alignment} is not a power of two")
        data_start = -(-offset // alignment) * alignment

        # llama.cpp's rule (gguf.cpp): each tensor starts where the one before it ends, padded
        # to the alignment. That also rules out overlapping and misaligned tensors.
        expected = 0
        for name, dims, type_id, rel_offset in infos:
            if name in self.tensors:
                raise _Damaged(f"duplicate tensor {name}")
            if rel_offset != expected:
                raise _Damaged(f"tensor {name} has data offset {rel_offset}, expected {expected} "
                               f"(tensors must follow each other, aligned to {alignment})")
            info = self._tensor_info(name, dims, type_id, data_start + rel_offset)
            self.tensors[name] = info
            expected += -(-info.n_bytes // alignment) * alignment

    def _read_value(self, vtype: int, offset: int, key: str) -> tuple[Any, int]:
        """The value of `key` (decoded, or a _LazyArray), and the offset after it."""
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            self._need(offset, scalar[0].size, f"value of {key}")
            return scalar[0].unpack_from(self._buf, offset)[0], offset + scalar[0].size
        if vtype == _STRING:
            raw, end = self._string(offset, f"value of {key}")
            try:
                return raw.decode("utf-8"), end
            except UnicodeDecodeError as e:
                return _Unreadable(str(e)), end
        if vtype == _ARRAY:
            self._need(offset, _ARRAY_HEADER.size, f"array header of {key}")
            etype, count = _ARRAY_HEADER.unpack_from(self._buf, offset)
            offset += _ARRAY_HEADER.size
            return _LazyArray(etype, count, offset), self._skip_array(etype, count, offset, key, 1)
        raise _Damaged(f"metadata key {key} has unknown value type {vtype}")

    def _skip_array(self, etype: int, count: int, offset: int, key: str, depth: int) -> int:
        """The offset just past an array's `count` elements of type `etype` starting at `offset`."""
        if depth > _MAX_ARRAY_DEPTH:
            raise _Damaged(f"metadata key {key}: arrays nested more than {_MAX_ARRAY_DEPTH} deep")
        min_size = _MIN_SIZE.get(etype)
        if min_size is None:
            raise _Damaged(f"metadata key {key} is an array of unknown value type {etype}")
        self._need(offset, count * min_size, f"array of {count} elements for {key}")  # bounds the loops below
        if etype in _SCALARS:
            return offset + count * min_size
        if etype == _STRING:
            return self._skip_strings(count, offset, key)
        for _ in range(count):  # arrays of arrays
            self._need(offset, _ARRAY_HEADER.size, f"array header in {key}")
            inner_type, inner_count = _ARRAY_HEADER.unpack_from(self._buf, offset)
            offset = self._skip_array(inner_type, inner_count, offset + _ARRAY_HEADER.size, key, depth + 1)
        return offset

    def _skip_strings(self, count: int, offset: int, key: str) -> int:
        """The offset just past `count` strings starting at `offset`.

        Each string's length says where the next one starts: a chain one Python step per
        string would follow (~0.1 us each, 40 ms for a 400k-entry vocabulary). Instead,
        numpy finds in a window every position whose 8 bytes read as a length below 256
        (a "candidate": nearly every real length field in a vocabulary is one), and from a
        position known to start a string we follow the chain at once through consecutive
        candidates whose lengths point exactly at the next candidate. Every step uses the
        exact length, so the result is the sequential walk's; positions that are not
        candidates (longer strings, window edges) take one checked sequential step.
        """
        buf, size, unpack = self._buf, self.file_size, _U64.unpack_from
        if count < 256:
            for _ in range(count):
                self._need(offset, 8, f"string length in {key}")
                offset += 8 + unpack(buf, offset)[0]
            self._need(offset, 0, f"string in {key}")
            return offset
        left = count
        while left:
            window = min(size - offset, max(1 << 12, min(left * 32, 1 << 17)))
            if window < 16:  # too little for candidates: step once
                self._need(offset, 8, f"string length in {key}")
                offset += 8 + unpack(buf, offset)[0]
                self._need(offset, 0, f"string in {key}")
                left -= 1
                continue
            w = np.frombuffer(buf, dtype=np.uint8, count=window, offset=offset)
            zero = w == 0
            high_zero = zero[1 : window - 6].copy()  # bytes 1..7 of the u64 at each position p <= window - 8
            for b in range(2, 8):
                high_zero &= zero[b : window - 7 + b]
            cand = np.flatnonzero(high_zero)
            nxt = cand + 8 + w[cand]
            breaks = np.flatnonzero(nxt[:-1] != cand[1:])  # the chain leaves the candidates after these
            rel = 0
            while left and rel <= window - 8:
                i = int(np.searchsorted(cand, rel))
                if i < len(cand) and cand[i] == rel:
                    j = int(np.searchsorted(breaks, i))
                    last = int(breaks[j]) if j < len(breaks) else len(cand) - 1
                    k = min(last - i + 1, left)
                    rel = int(nxt[i + k - 1])
                    left -= k
                else:  # a long string: its length is not a candidate
                    rel += 8 + unpack(buf, offset + rel)[0]
                    left -= 1
            offset += rel
            self._need(offset, 0, f"string in {key}")
        return offset

    def _tensor_info(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise UnsupportedModelError(
                f"{self.path}: unknown quant type id {type_id} in the tensor table"
            ) from None
        if dims[0] % block:
            raise CorruptModelError(
                f"{self.path}: tensor {name} has rows of {dims[0]} elements, "
                f"not a multiple of the {ggml_type.name} block size {block}"
            )
        n_elements = 1
        for d in dims:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        if offset + n_bytes > self.file_size:
            raise CorruptModelError(
                f"{self.path}: tensor {name} ends at byte {offset + n_bytes} "
                f"but the file has only {self.file_size} bytes (truncated?)"
            )
        shape = tuple(reversed(dims))  # numpy order
        raw = self._bytes[offset : offset + n_bytes]
        plain = _PLAIN_DTYPES.get(ggml_type)
        if plain is not None:
            data = raw.view(plain).reshape(shape)
        else:  # quantized (and BF16): bytes, one row of blocks per innermost row
            data = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
        return TensorInfo(name=name, ggml_type=ggml_type, shape=dims, n_bytes=n_bytes, offset=offset, data=data)

    # -- metadata -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k in self._values if not k.startswith("GGUF.")]

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key` as gguf-py's ReaderField.contents() gives it (lists for arrays)."""
        if key not in self._values:
            return default
        value = self._values[key]
        if isinstance(value, _Unreadable):
            raise CorruptModelError(f"{self.path}: metadata key {key} is unreadable ({value.reason})")
        if not isinstance(value, _LazyArray):
            return value
        try:
            return self._decode_array(value)
        except (UnicodeDecodeError, struct.error, ValueError) as e:
            raise CorruptModelError(f"{self.path}: metadata key {key} is unreadable ({e})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"{self.path}: required metadata key {key} is missing")
        return value

    def _decode_array(self, a: _LazyArray) -> list:
        """Bounds were checked when the file was opened."""
        if a.count == 0:
            return []
        scalar = _SCALARS.get(a.element_type)
        if scalar is not None:
            return np.frombuffer(self._buf, dtype=scalar[1], count=a.count, offset=a.offset).tolist()
        buf, unpack = self._buf, _U64.unpack_from
        if a.element_type == _STRING:
            out, offset = [], a.offset
            for _ in range(a.count):
                n = unpack(buf, offset)[0]
                out.append(str(buf[offset + 8 : offset + 8 + n], "utf-8"))
                offset += 8 + n
            return out
        return self._decode_nested(a)

    def _decode_nested(self, a: _LazyArray) -> list:
        """An array of arrays, flattened the way gguf-py does: all leaf values in order, read
        as strings if the first element's innermost type is string, else as numbers (string
        leaves then give their bytes as ints)."""
        buf = self._buf
        leaves: list[tuple[int, int, int]] = []  # (type, offset, n_bytes)

        def walk(etype: int, count: int, offset: int) -> int:
            for _ in range(count):
                if etype == _ARRAY:
                    inner_type, inner_count = _ARRAY_HEADER.unpack_from(buf, offset)
                    offset = walk(inner_type, inner_count, offset + _ARRAY_HEADER.size)
                elif etype == _STRING:
                    n = _U64.unpack_from(buf, offset)[0]
                    leaves.append((etype, offset + 8, n))
                    offset += 8 + n
                else:
                    size = _SCALARS[etype][0].size
                    leaves.append((etype, offset, size))
                    offset += size
            return offset

        walk(a.element_type, a.count, a.offset)
        leaf_type, count, offset = a.element_type, a.count, a.offset
        while leaf_type == _ARRAY and count:
            leaf_type, count = _ARRAY_HEADER.unpack_from(buf, offset)
            offset += _ARRAY_HEADER.size
        if leaf_type == _STRING and count:
            return [str(buf[o : o + n], "utf-8") for _, o, n in leaves]
        out: list = []
        for t, o, n in leaves:
            if t == _STRING:
                out.extend(buf[o : o + n])
            else:
                out.append(_SCALARS[t][0].unpack_from(buf, o)[0])
        return out

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UnsupportedModelError(f"{self.path}: tensor {name} is missing") from None

    def check_unchanged(self) -> None:
        """Raise ModelFileChangedError if the file was truncated, replaced or rewritten since it
        was opened: the memory map would then show other bytes (or end the process with SIGBUS
        past a new end), and expert reads would return other weights. A stat per call: cheap
        enough to run before every step."""
        try:
            now = _identity(os.stat(self.path))
        except OSError as e:
            raise ModelFileChangedError(f"{self.path} is gone while the model runs from it ({e.strerror})") from None
        if now != self._identity:
            dev, ino, size, _ = self._identity
            what = ("replaced by another file" if now[:2] != (dev, ino) else
                    f"truncated to {now[2]} bytes" if now[2] < size else
                    f"resized to {now[2]} bytes" if now[2] != size else "rewritten")
            raise ModelFileChangedError(f"{self.path} was {what} while the model was running from it: load it again")

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they go too)."""
        self.tensors = {}
        self._values, self._types = {}, {}
        buf = self.__dict__.pop("_buf", None)
        if buf is not None:
            try:
                buf.release()
            except BufferError:  # something still reads through it: it goes when that does
                pass
        self._map = self._bytes = None  # type: ignore[assignment]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Damaged(f"{what} is not UTF-8 ({e})") from None


def _check_header(path: Path) -> int:
    """Reject a file that is not GGUF, or whose header is damaged, with a one-line reason."""
    if not path.exists():
        raise OffloadError(f"no such file: {path}")
    if path.is_dir():
        raise OffloadError(f"{path} is a directory, not a GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < 4 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
        raise CorruptModelError(f"{path} is not a GGUF file (bad magic)")
    if len(head) < _HEADER.size:
        raise CorruptModelError(f"{path}: truncated GGUF header")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise CorruptModelError(
            f"{path}: header claims {n_kv} metadata keys and {n_tensors} tensors, "
            f"more than {size} bytes can hold (corrupt or truncated)"
        )
    return size
