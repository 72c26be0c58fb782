"""Tokenizer and streaming detokenizer, on the real vocabularies of five model families,
against llama.cpp's own tokenizer test cases (../shared/data/vocab)."""

from __future__ import annotations

import pytest

from offload.testing import vocab_path
from offload.tokenizer import StreamDecoder, Tokenizer

FAMILIES = ["llama-spm", "qwen2", "llama-bpe", "deepseek-llm", "phi-3"]


def load_cases(shared_data, family: str) -> list[tuple[str, list[int]]]:
    base = shared_data / "vocab" / f"ggml-vocab-{family}.gguf"
    texts = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outs = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(outs) > 30
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizer_cases(shared_data, family):
    tok = Tokenizer(vocab_path(family))
    for text, expected in load_cases(shared_data, family):
        assert tok.encode(text, add_special=False) == expected, repr(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_never_splits_a_character(shared_data, family):
    """Streamed pieces are whole characters and add up to the one-shot decoding."""
    tok = Tokenizer(vocab_path(family))
    for text, _ in load_cases(shared_data, family):
        ids = tok.encode(text, add_special=False)
        decoder = StreamDecoder(tok)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        whole = tok.decode(ids)
        assert "".join(pieces) == whole
        if "\ufffd" not in whole:
            assert not any("\ufffd" in p for p in pieces), repr(text)


def test_byte_fallback_tokens_are_held_until_the_character_completes():
    tok = Tokenizer(vocab_path("llama-spm"))
    ids = tok.encode("🦙", add_special=False)  # "▁", then four <0x..> byte tokens: not in the SPM vocab
    assert len(ids) == 5
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert pieces == [" ", "", "", "", "🦙"]


def test_bos_follows_metadata():
    spm = Tokenizer(vocab_path("llama-spm"))
    assert spm.adds_bos and spm.encode("Hello")[0] == spm.bos_id
    assert spm.encode("Hello", add_special=False)[0] != spm.bos_id


def test_threads_decode_at_once():
    """Parallel server slots decode their replies at the same time on one tokenizer: each
    thread gets its own tokens' text (llama.cpp's token_to_piece runs without the GIL, so a
    shared output buffer was overwritten by the other threads)."""
    import threading

    tok = Tokenizer(vocab_path("llama-spm"))
    texts = ["In the beginning God created the heaven and the earth.", "Blessed are the meek: for they shall",
             "And the LORD said unto Moses, Stretch out thine hand", "Quis custodiet ipsos custodes? 🦙 ünïcödé"]
    ids = [tok.encode(t, add_special=False) for t in texts]
    got: dict = {}

    def decode_many(i: int) -> None:
        got[i] = {tok.decode(ids[i]) for _ in range(300)}

    threads = [threading.Thread(target=decode_many, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got[i] == {tok.decode(ids[i])} for i in range(len(texts)))
