"""A GGUF file: metadata, the tensor table, and memory-mapped tensor data.

Parsing is done by the `gguf` package (llama.cpp's own reader). This module adds what a
runtime needs on top: checks that turn a damaged file into one clear error instead of
a traceback deep inside numpy, and tensor records that keep the data in its GGUF
encoding (a view into the memory map; nothing is copied or dequantized here).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC

from .errors import CorruptModelError, OffloadError, UnsupportedModelError

_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor_count, kv_count
_MIN_KV_BYTES = 8 + 4  # a key's length prefix + the value type: a lower bound per entry
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


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


class GGUFFile:
    """An opened GGUF file. Metadata values are decoded lazily (vocabularies are large)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file_size = _check_header(self.path)
        try:
            self._reader = GGUFReader(self.path, "r")
        except ValueError as e:
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
            if unknown:
                raise UnsupportedModelError(
                    f"{self.path}: unknown quant type id {unknown.group(1)} in the tensor table"
                ) from None
            raise CorruptModelError(f"{self.path}: corrupt or truncated GGUF ({e})") from None
        except Exception as e:  # the reader indexes raw bytes: damage surfaces as anything
            raise CorruptModelError(
                f"{self.path}: corrupt or truncated GGUF ({type(e).__name__}: {e})"
            ) from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._reader.tensors:
            info = TensorInfo(
                name=t.name,
                ggml_type=t.tensor_type,
                shape=tuple(int(d) for d in t.shape),
                n_bytes=int(t.n_bytes),
                offset=int(t.data_offset),
                data=t.data,
            )
            block, _ = GGML_QUANT_SIZES[info.ggml_type]
            if info.shape[0] % block:
                raise CorruptModelError(
                    f"{self.path}: tensor {info.name} has rows of {info.shape[0]} elements, "
                    f"not a multiple of the {info.type_name} block size {block}"
                )
            if info.offset + info.n_bytes > self.file_size:
                raise CorruptModelError(
                    f"{self.path}: tensor {info.name} ends at byte {info.offset + info.n_bytes} "
                    f"but the file has only {self.file_size} bytes (truncated?)"
                )
            self.tensors[info.name] = info

    # -- metadata -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [k for k in self._reader.fields if not k.startswith("GGUF.")]

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise CorruptModelError(f"{self.path}: metadata key {key} is unreadable ({e})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"{self.path}: required metadata key {key} is missing")
        return value

    def field(self, key: str):
        """The raw gguf ReaderField (for copying metadata into another file)."""
        return self._reader.fields.get(key)

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UnsupportedModelError(f"{self.path}: tensor {name} is missing") from None

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they go too)."""
        self.tensors = {}
        self._reader = None  # type: ignore[assignment]


def _check_header(path: Path) -> int:
    """Reject what the gguf reader would choke on (or loop on) with a one-line reason."""
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
