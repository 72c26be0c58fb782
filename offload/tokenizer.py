"""Tokenizer and detokenizer: llama.cpp's own, loaded from the GGUF's vocabulary only.

Using llama.cpp's tokenizer (through llama-cpp-python's C API, `vocab_only`) means every
tokenizer family a GGUF can carry (SentencePiece, byte-level BPE with each model's
pre-tokenizer, ...) behaves exactly as in llama.cpp, with no weights loaded.
"""

from __future__ import annotations

import codecs
import ctypes
import os

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


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike[str]):
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
        self._piece_buf = ctypes.create_string_buffer(256)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS where the model's metadata says to."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        while True:
            buf = (self._lib.llama_token * n_max)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for (a UTF-8 character may span several tokens)."""
        buf = self._piece_buf
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
