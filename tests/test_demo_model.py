"""The bundled demo model (offload/data/MODEL_CARD.md, made by tools/train_demo.py).

It was really trained, so these tests check behaviour that random weights cannot show:
its perplexity on held-out chapters (which it never saw) stays where training left it,
llama.cpp computes the same logits and greedy text from the file, what it writes is words
of its language, and its routing has the structure the expert cache and the prefetcher
live on (experts repeat from token to token; layer L+1's router applied to layer L's
hidden state predicts layer L+1's choice).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from offload import Model
from offload.demo import demo_heldout_text, demo_model_path
from offload.gguf_file import GGUFFile
from offload.sampling import SamplingParams
from offload import arch
from offload.store.plan import make_plan
from offload.testing import float_bits, llama_cpp_greedy, llama_cpp_logits

DEMO = demo_model_path()
WINDOW = 512  # the model's trained context
PPL_WINDOWS = 8  # the first 8 x 512 held-out tokens

# Measured when the model shipped (offload, the Q8_0 file, these 8 windows; the whole held-out
# set scores 29.84, MODEL_CARD.md). offload's numerics are deterministic, so the margin only
# has to let a retrained file of the same recipe pass; a wrong RoPE layout, norm, router or
# kernel sends it up far more (an untrained model: ~4000; after 40 steps: 227).
PPL_MEASURED = 24.15
PPL_BOUND = 24.6


def heldout_chapters() -> list[str]:
    return demo_heldout_text().strip().split("\n\n")


def heldout_tokens(m: Model) -> np.ndarray:
    """BOS chapter EOS per held-out chapter, as the model was trained."""
    ids: list[int] = []
    for chapter in heldout_chapters():
        ids += m.tokenize(chapter) + [m.tokenizer.eos_id]
    return np.array(ids)


@pytest.fixture(scope="module")
def demo():
    with Model.load(DEMO, n_ctx=WINDOW) as m:
        yield m


def test_the_demo_model_is_a_small_mixtral_shaped_moe(demo):
    assert DEMO.stat().st_size <= 25_000_000
    a = demo.args
    assert (a.n_expert, a.n_expert_used) == (8, 2) and a.n_layer >= 4
    f = GGUFFile(DEMO)
    try:
        assert f.architecture == "llama"
        assert {t.type_name for t in f.tensors.values() if t.name.endswith("_exps.weight")} == {"Q8_0"}
    finally:
        f.close()


def test_heldout_perplexity_stays_within_its_bound(demo):
    tokens = heldout_tokens(demo)
    nll, n = 0.0, 0
    for w in range(PPL_WINDOWS):
        chunk = tokens[w * WINDOW: (w + 1) * WINDOW + 1]
        logits = demo.logits(chunk[:-1].tolist()).astype(np.float64)
        top = logits.max(1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        n += len(chunk) - 1
    ppl = np.exp(nll / n)
    assert n == PPL_WINDOWS * WINDOW
    assert ppl <= PPL_BOUND, f"held-out perplexity {ppl:.2f} above its bound {PPL_BOUND} (shipped: {PPL_MEASURED})"


def test_llama_cpp_computes_the_same_logits_on_heldout_text(demo):
    ids = heldout_tokens(demo)[:WINDOW].tolist()
    ours = demo.logits(ids)
    ref = llama_cpp_logits(DEMO, ids, n_ctx=WINDOW)
    differ = int(np.sum(float_bits(ours) != float_bits(ref)))
    err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    assert differ == 0, f"{differ} logits differ from llama.cpp's (relative L2 error {err:.2e})"


@pytest.mark.parametrize("prompt", ["And Moses said unto the people,", "Blessed are they that"])
def test_greedy_text_equals_llama_cpp(demo, prompt):
    ids = demo.tokenize(prompt)
    ours = list(demo.generate_tokens(ids, 64, SamplingParams(temperature=0.0)))
    assert ours == llama_cpp_greedy(DEMO, ids, len(ours), n_ctx=WINDOW)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_what_it_writes_is_words_of_its_language(demo):
    """Greedy and sampled continuations are made of words the held-out chapters use (a
    random-weight model with this vocabulary writes subword fragments)."""
    vocabulary = set(words(demo_heldout_text()))
    for temperature, seed in ((0.0, 0), (0.8, 1), (0.8, 2)):
        text = "".join(demo.generate("And it came to pass, when the king heard", max_tokens=96,
                                     temperature=temperature, seed=seed))
        w = words(text)
        known = sum(x in vocabulary for x in w) / len(w)
        assert len(w) >= 30 and known >= 0.9, (temperature, known, text)


def test_the_commands_run_the_demo_model_without_a_model_argument(demo):
    prompt = "And the LORD spake unto Moses, saying,"
    r = subprocess.run([sys.executable, "-m", "offload", "generate", "-p", prompt, "-n", "24", "--temp", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = "".join(demo.generate(prompt, max_tokens=24, temperature=0.0))
    assert r.stdout.startswith(prompt) and expected in r.stdout
    # chat: a line in, a reply that ends by itself (EOS) well before the token limit
    r = subprocess.run([sys.executable, "-m", "offload", "chat", "-n", "200", "--temp", "0"],
                       input="The LORD is my shepherd; I shall not want.\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reply = r.stdout.strip()
    status = [line for line in r.stderr.splitlines() if "tok/s" in line]
    assert len(words(reply)) >= 5 and status and "stop: length" not in status[0], (reply, status)


# -- routing facts on learned routing ------------------------------------------------------

@pytest.fixture(scope="module")
def heldout_trace(demo, tmp_path_factory):
    """Routing of 256 held-out tokens fed one at a time (each step is one token's choice)."""
    path = tmp_path_factory.mktemp("trace") / "demo.npz"
    prompt = heldout_tokens(demo)[:2].tolist()
    # Teacher-forcing a held-out text through generate() is not offered; greedy decode of
    # a held-out prompt gives each token its own routing step.
    list(demo.generate_tokens(prompt, 256, SamplingParams(temperature=0.0), record_trace=path))
    return demo.last_trace


def repeat_rates(experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the share of token t+1's experts that token t also chose, and the same
    share for two different tokens drawn at random from the run (chance, given how unevenly
    the layer loads its experts)."""
    S, L, k = experts.shape
    repeat = (experts[1:, :, :, None] == experts[:-1, :, None, :]).any(-1).sum(-1).mean(0) / k
    chosen = np.zeros((S, L, experts.max() + 1))
    np.put_along_axis(chosen, experts, 1.0, axis=2)
    per_expert = chosen.sum(0)  # (L, E): how many steps chose each expert
    chance = ((per_expert ** 2).sum(-1) - chosen.sum((0, 2))) / (S * (S - 1)) / k
    return repeat, chance


def test_the_last_layer_repeats_its_experts_from_token_to_token(heldout_trace):
    """Measured at shipping: repeat 0.27 0.22 0.28 0.42 against chance 0.26 0.30 0.29 0.32:
    the early layers route each token afresh, the last one keeps experts across tokens."""
    ex = heldout_trace.experts[heldout_trace.prompt_tokens:].astype(np.int64)  # (S, L, k)
    assert (ex >= 0).all()
    repeat, chance = repeat_rates(ex)
    assert repeat[-1] >= chance[-1] + 0.05, (repeat, chance)
    # the chance level is right: a run shuffled in time repeats at about that rate
    shuffled = ex[np.random.default_rng(0).permutation(len(ex))]
    assert np.abs(repeat_rates(shuffled)[0] - chance).max() < 0.06


def test_the_next_layers_router_predicts_its_choice(demo, monkeypatch):
    """The runtime's lookahead predictor (layer L+1's ffn_norm and router applied to the
    hidden state leaving layer L), run for real by the tiered store's prefetcher."""
    g = GGUFFile(DEMO)
    try:
        minimum = make_plan(g, arch.model_args(g), WINDOW, 0).minimum
    finally:
        g.close()
    from offload import lookahead_learning

    # learning keeps within a share of the time (machine-dependent); here it learns from every token
    monkeypatch.setattr(lookahead_learning, "SHARE", float("inf"))
    with Model.load(DEMO, n_ctx=WINDOW, memory_budget=minimum, prefetch_depth=1, prefetch="always") as m:
        prompt = heldout_tokens(m)[:64].tolist()
        list(m.generate_tokens(prompt, 128, SamplingParams(temperature=0.0)))
        s = m.stats()
    # Measured: 0.84 (precision 0.61) on this continuation, which is llama.cpp's greedy one
    # token for token, counting the tokens before the corrections learned online
    # (offload.lookahead_learning) are in use; 0.69 / 0.48 without them (layer 0 -> 1 guessed
    # at chance). It predicts the top 2 plus near ties, at most 3 experts of 8: guessing would
    # recall 3/8. The next token's first layer, guessed at the end of a token once the learned
    # guess recalls 0.4: 0.75 over its 63 guesses.
    assert s["prediction_recall_d1"] >= 0.8, s["prediction_recall_d1"]
    assert s["lookahead_learned_0_to_1"]["using"] != "plain"
    assert s["predictions_next_token"] >= 32 and s["prediction_recall_next_token"] >= 0.55, s
