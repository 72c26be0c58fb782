"""The sampler against direct implementations of each filter."""

from __future__ import annotations

import numpy as np

from offload.sampling import Sampler, SamplingParams


def draw_distribution(params: SamplingParams, logits: np.ndarray, n: int = 4000) -> np.ndarray:
    s = Sampler(params)
    counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=len(logits))
    return counts / n


LOGITS = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.03, 0.01], dtype=np.float32))


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == int(np.argmax(logits))


def test_temperature_one_without_filters_follows_softmax():
    p = draw_distribution(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), LOGITS)
    assert np.allclose(p, np.exp(LOGITS) / np.exp(LOGITS).sum(), atol=0.03)


def test_top_k_keeps_k_renormalized():
    p = draw_distribution(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=2), LOGITS)
    assert p[2:].sum() == 0
    assert abs(p[0] - 0.40 / 0.65) < 0.03


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = draw_distribution(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, seed=3), LOGITS)
    assert p[3:].sum() == 0 and p[2] > 0  # 0.40 + 0.25 < 0.7 <= 0.80


def test_min_p_drops_tokens_below_share_of_best():
    p = draw_distribution(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=4), LOGITS)
    assert p[4:].sum() == 0 and p[3] > 0  # 0.10 >= 0.2 * 0.40 > 0.06


def test_low_temperature_sharpens():
    p = draw_distribution(SamplingParams(temperature=0.2, top_k=0, top_p=1.0, min_p=0.0, seed=5), LOGITS)
    assert p[0] > 0.9


def test_repeat_penalty_as_llama_cpp():
    logits = np.array([2.0, -1.0, 1.5, 0.5], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    s.accept(0)  # 2.0 -> 1.0, now below token 2
    assert s.sample(logits) == 2
    s.accept(2)  # 1.5 -> 0.75; token 0 (1.0) wins again
    assert s.sample(logits) == 0
    s2 = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    s2.accept(1)  # negative logits get more negative
    assert s2.sample(np.array([-0.6, -0.5], dtype=np.float32)) == 0


def test_seed_reproducible():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    a, b = Sampler(params), Sampler(params)
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]


def test_penalties_as_llama_cpps_formula():
    """llama_sampler_penalties: seen tokens' logits / repeat (* when <= 0), then minus
    count * frequency + presence; unseen ones untouched."""
    logits = np.array([2.0, -1.0, 1.5, 0.5, 0.0], dtype=np.float32)
    s = Sampler(SamplingParams(repeat_penalty=1.25, presence_penalty=0.3, frequency_penalty=0.2, repeat_last_n=4))
    for t in (0, 1, 0, 4, 0):  # the window keeps the last 4: 1, 0, 4, 0
        s.accept(t)
    expected = logits.copy()
    expected[0] = np.float32(2.0) / np.float32(1.25) - (np.float32(2) * np.float32(0.2) + np.float32(0.3))
    expected[1] = np.float32(-1.0) * np.float32(1.25) - (np.float32(0.2) + np.float32(0.3))
    expected[4] = np.float32(0.0) - (np.float32(0.2) + np.float32(0.3))
    np.testing.assert_array_equal(s.penalized(logits), expected)
    assert Sampler(SamplingParams(presence_penalty=0.3, repeat_last_n=0)).params.penalizes is False


def test_greedy_with_penalties_gives_llama_cpps_tokens():
    """The demo model, greedy after the penalties, against llama-cpp-python's sampler chain
    (penalties, then greedy) on the same logits. llama-cpp-python does not feed the prompt to
    its penalties (llama-server and offload do), so the prompt is the BOS token alone, which
    neither engine picks."""
    from offload import Model
    from offload.demo import demo_model_path
    from offload.testing import llama_cpp_model

    penalties = dict(repeat_penalty=1.1, presence_penalty=0.6, frequency_penalty=0.9)
    llm = llama_cpp_model(demo_model_path(), n_ctx=256, logits_all=False)
    try:
        out = llm.create_completion([1], max_tokens=48, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, **penalties)
        expected = llm.tokenize(out["choices"][0]["text"].encode(), add_bos=False, special=True)
    finally:
        llm.close()
    with Model.load(demo_model_path(), n_ctx=256) as m:
        tokens = list(m.generate_tokens([1], 48, SamplingParams(temperature=0.0, **penalties)))
        plain = list(m.generate_tokens([1], 48, SamplingParams(temperature=0.0)))
    assert m.tokenizer.decode(tokens) == out["choices"][0]["text"]
    assert len(expected) > 20 and tokens != plain  # the penalties changed the text
