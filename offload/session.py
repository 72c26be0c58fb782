"""Saved sessions: the tokens in the KV cache and the cache's rows, written to a file and read
back, so that a conversation or a long prompt continues without running its tokens again.

A state file is an uncompressed .npz: a JSON header (what model and cache it belongs to, the
tokens, a SHA-256 of the rows) and one array per layer and cache. It is written to a temporary
file in the same folder and renamed over the target, so a crash never leaves half a file.
A state from another model (file size and a hash of the first MiB, which hold the GGUF
header), another cache type or context layout, or a damaged file is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
import zlib

import numpy as np

from .atomic import atomic_write
from .errors import OffloadError

MAGIC = "offload-kv-state"
VERSION = 1
_HEADER_BYTES = 1 << 20  # the model's identity: its size and a hash of this much of its start


class StateError(OffloadError):
    """A state file that does not belong to this model and cache, or is damaged."""


def model_identity(path: str | os.PathLike[str]) -> dict:
    """The file's size and a SHA-256 of its first MiB (GGUF metadata and tensor table)."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    return {"size": os.path.getsize(path), "header_sha256": hashlib.sha256(head).hexdigest()}


def _layer_rows(cache, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The cells of a layer that hold positions: the first n_past, or a whole wrapped ring, or
    after a context shift the cells up to the last used one."""
    positions = cache.cell_positions(layer)
    n = min(cache.n_past, len(cache.k[layer])) if positions is None else len(positions)
    v = cache.v[layer]
    return cache.k[layer][:n], None if v is None else v[:n]


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).view(np.uint8).tobytes())
    return h.hexdigest()


def save_state(model, path: str | os.PathLike[str], tokens: list[int], extra: dict | None = None) -> None:
    """Write `model`'s KV cache, which holds `tokens`, to `path` atomically; `extra`: more
    JSON-able facts to keep beside it (a chat's messages)."""
    model.transformer.shift_keys()  # a context shift's pending rotation, as the next step would do first
    cache = model.transformer.cache
    if len(tokens) != cache.n_past:
        raise StateError(f"the cache holds {cache.n_past} positions but {len(tokens)} tokens were given")
    arrays: dict[str, np.ndarray] = {}
    layout = None  # after a context shift: each group of cells' (cells, window, head), positions in cells{j}
    if cache.layout is not None:
        layout = []
        for j, ((n_cells, window), cells) in enumerate(cache.layout.items()):
            layout.append([n_cells, window, cells.head])
            arrays[f"cells{j}"] = cells.pos.copy()
    for i in range(len(cache.k)):
        k, v = _layer_rows(cache, i)
        arrays[f"k{i}"] = k
        if v is not None:
            arrays[f"v{i}"] = v
    header = {
        "magic": MAGIC, "version": VERSION, "model": model_identity(model.path),
        "type_k": cache.type_k, "type_v": cache.type_v, "cells": [len(k) for k in cache.k],
        "n_past": cache.n_past, "tokens": [int(t) for t in tokens], "sha256": _digest(arrays), "extra": extra or {},
        "layout": layout,
    }
    with atomic_write(path) as f:  # a full disk leaves the old state, not half a new one
        np.savez(f, header=np.array(json.dumps(header)), **arrays)


def read_state(path: str | os.PathLike[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of a state file; StateError if it is not one or is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {name: z[name] for name in z.files if name != "header"}
    except FileNotFoundError:
        raise StateError(f"{path}: no such state file") from None
    except (OSError, ValueError, KeyError, EOFError, TypeError, ArithmeticError, MemoryError, NotImplementedError,
            struct.error, zipfile.BadZipFile, zlib.error) as e:  # whatever a damaged zip makes them raise
        raise StateError(f"{path}: not a state file or damaged ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise StateError(f"{path}: not an offload state file")
    if header.get("version") != VERSION:
        raise StateError(f"{path}: state file version {header.get('version')}, this offload reads {VERSION}")
    if _digest(arrays) != header.get("sha256"):
        raise StateError(f"{path}: damaged state file (its checksum does not match)")
    return header, arrays


def load_state(model, path: str | os.PathLike[str]) -> tuple[list[int], dict]:
    """Restore a state file into `model`'s KV cache; returns the tokens it holds and its extra."""
    header, arrays = read_state(path)
    cache = model.transformer.cache
    if header["model"] != model_identity(model.path):
        raise StateError(f"{path}: saved from another model file, not {model.path}")
    if (header["type_k"], header["type_v"]) != (cache.type_k, cache.type_v):
        raise StateError(f"{path}: saved with KV cache types K {header['type_k']}, V {header['type_v']}; this model "
                         f"runs K {cache.type_k}, V {cache.type_v} (use -ctk/-ctv to match)")
    if header["cells"] != [len(k) for k in cache.k]:
        raise StateError(f"{path}: saved with another context size (-c) than this model's {cache.n_ctx}")
    n_past, tokens = int(header["n_past"]), list(header["tokens"])
    if n_past != len(tokens) or n_past > cache.n_ctx:
        raise StateError(f"{path}: holds {n_past} positions, more than the context of {cache.n_ctx}")
    for i in range(len(cache.k)):
        k, v = arrays.get(f"k{i}"), arrays.get(f"v{i}")
        if k is None or k.shape[1:] != cache.k[i].shape[1:] or k.dtype != cache.k[i].dtype or \
                (cache.v[i] is not None and (v is None or v.shape != k.shape[:1] + cache.v[i].shape[1:])):
            raise StateError(f"{path}: layer {i}'s cache rows do not fit this model")
    layout = _layout(path, header, arrays, cache)
    cache.n_past = 0  # cleared first: a failure below leaves an empty cache, never a mixed one
    for i in range(len(cache.k)):
        cache.k[i][: len(arrays[f"k{i}"])] = arrays[f"k{i}"]
        if cache.v[i] is not None:
            cache.v[i][: len(arrays[f"v{i}"])] = arrays[f"v{i}"]
    cache.n_past = n_past
    cache.layout = layout
    return tokens, header.get("extra", {})


def _layout(path, header: dict, arrays: dict[str, np.ndarray], cache):
    """The cells' positions a state saved after a context shift holds (None: none saved)."""
    from .kv_cells import Cells

    saved = header.get("layout")
    if saved is None:
        return None
    layout = {}
    try:
        for j, (n_cells, window, head) in enumerate(saved):
            cells = Cells(int(n_cells), int(window))
            pos = arrays[f"cells{j}"]
            if pos.shape != cells.pos.shape or (n_cells, window) not in cache.groups:
                raise ValueError
            cells.pos[:] = pos
            cells.head = int(head)
            layout[(n_cells, window)] = cells
    except (ValueError, TypeError, KeyError):
        raise StateError(f"{path}: its cells' positions do not fit this model") from None
    return layout
