"""Tokenizer and detokenizer: llama.cpp's own, loaded from the GGUF's vocabulary only.

Using llama.cpp's tokenizer (through llama-cpp-python's C API, `vocab_only`) means every
tokenizer family a GGUF can carry (SentencePiece, byte-level BPE with each model's
pre-tokenizer, ...) behaves exactly as in llama.cpp, with no weights loaded.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading

from .errors import CorruptModelError


def load_llama_cpp():
    """llama_cpp, imported on first use (it loads a shared library), with its logs silenced."""
    import llama_cpp

    _silence_llama_logs(llama_cpp)
    return llama_cpp


_LOG_CALLBACK = None


def _silence_llama_logs(llama_cpp) -> None:
    """llama.cpp logs every load to stderr; keep a user's terminal clean unless asked."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None or os.environ.get("OFFLOAD_LLAMA_LOGS"):
        return
    _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the character each byte stands for in a BPE vocabulary
    (llama.cpp's unicode_byte_to_utf8)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bytes_without_token(kind: str, tokens: list[str]) -> frozenset[int]:
    """The bytes for which llama.cpp's byte fallback finds no token in this vocabulary: it
    aborts the whole process (an uncaught std::out_of_range) when text needs one of them,
    so offload refuses such text first. Real vocabularies have every byte."""
    have = set(tokens)
    if kind in ("llama", "t5"):  # SentencePiece: <0xXX>, or the byte itself
        return frozenset(b for b in range(256) if f"<0x{b:02X}>" not in have and not (b < 0x80 and chr(b) in have))
    if kind == "gpt2":
        return frozenset(b for b, c in enumerate(_gpt2_byte_chars()) if c not in have)
    return frozenset()


def _check_vocabulary(model_path, gguf=None) -> frozenset[int]:
    """Refuse a vocabulary llama.cpp would load but then crash on (one line instead of an
    abort), and return the bytes it has no token for (see bytes_without_token). `gguf`: the
    file already opened (a GGUFFile), else it is opened here."""
    from .gguf_file import GGUFFile

    opened = gguf is None
    gguf = GGUFFile(model_path) if opened else gguf
    try:
        kind = gguf.get("tokenizer.ggml.model")
        if not isinstance(kind, str) or kind in ("none", "no_vocab"):
            raise CorruptModelError(f"{model_path}: no tokenizer (tokenizer.ggml.model is {kind!r})")
        tokens = gguf.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise CorruptModelError(f"{model_path}: tokenizer.ggml.tokens is not a list of token texts")
        if len(set(tokens)) != len(tokens):  # llama.cpp asserts on it (id_to_token vs token_to_id): an abort
            raise CorruptModelError(f"{model_path}: the vocabulary holds the same token text twice")
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            values = gguf.get(key)
            if values is not None and (not isinstance(values, list) or len(values) != len(tokens)):
                raise CorruptModelError(f"{model_path}: {key} does not hold one value per token ({len(tokens)})")
        return bytes_without_token(kind, tokens)
    finally:
        if opened:
            gguf.close()


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike[str], gguf=None):
        self._missing_bytes = _check_vocabulary(model_path, gguf)  # gguf: Model.load's open GGUFFile, not parsed twice
        self._lib = lib = load_llama_cpp()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self._model = lib.llama_model_load_from_file(str(model_path).encode(), params)
        if not self._model:
            raise CorruptModelError(f"{model_path}: llama.cpp could not load the vocabulary")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        self.bos_id = lib.llama_vocab_bos(self._vocab)
        self.eos_id = lib.llama_vocab_eos(self._vocab)
        self.adds_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        for what, token in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if not -1 <= token < self.n_vocab:  # llama.cpp would index past its table
                self.close()
                raise CorruptModelError(f"{model_path}: the {what} token id {token} is outside the vocabulary of {self.n_vocab}")
        if self.adds_bos and self.bos_id < 0:
            self.close()
            raise CorruptModelError(f"{model_path}: the vocabulary asks for a BOS token but has none")
        self._piece_bufs = threading.local()  # one buffer per thread: ctypes calls let others run meanwhile

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS where the model's metadata says to."""
        data = text.encode("utf-8", errors="replace")  # a lone surrogate (from JSON or a terminal) becomes "?"
        if self._missing_bytes and not self._missing_bytes.isdisjoint(data):
            b = min(self._missing_bytes.intersection(data))
            raise CorruptModelError(f"this model's vocabulary has no token for byte 0x{b:02X}, which the text needs")
        n_max = len(data) + 8
        while True:
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for (a UTF-8 character may span several tokens)."""
        if not 0 <= token < self.n_vocab:  # a padded embedding row past the vocabulary: no text
            return b""
        buf = getattr(self._piece_bufs, "buf", None)
        if buf is None:
            buf = self._piece_bufs.buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class StreamDecoder:
    """Turns generated tokens into text as they come, never splitting a UTF-8 character.

    `special`: render control tokens as their text (e.g. "<|channel|>"), for a reply whose
    structure is written in them (gpt-oss's harmony format); otherwise they render as nothing."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.piece(token, special=self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
