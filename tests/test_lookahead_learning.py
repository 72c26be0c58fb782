"""Lookahead corrections learned online (offload.lookahead_learning): they find a next
router the plain guess misses, keep the plain guess where it is right, fit in what the
memory plan counts, and never change a token."""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model, arch, lookahead_learning
from offload.gguf_file import GGUFFile
from offload.lookahead_learning import NEXT_TOKEN, LookaheadLearning
from offload.store import make_plan

from test_predict import MANY, PROMPT, plan_for, share_budget

K, E = 2, 8


@pytest.fixture(autouse=True)
def unlimited_time(monkeypatch):
    """Learning keeps within a share of the time since it began: these tests, which feed it
    tokens faster than any model would, must not depend on how fast the machine is."""
    monkeypatch.setattr(lookahead_learning, "SHARE", float("inf"))


def stream(n_embd: int, folded: np.ndarray, truth: np.ndarray, tokens: int, seed: int = 0):
    """Tokens of a two-layer pair: (z_source, z_target, chosen), the target choosing its top-k
    of z_source @ truth (z_target is made so that z_target @ folded gives those logits)."""
    rng = np.random.default_rng(seed)
    pinv = np.linalg.pinv(folded)
    for _ in range(tokens):
        z = rng.standard_normal((1, n_embd)).astype(np.float32)
        y = z @ truth
        yield z, (y @ pinv).astype(np.float32), np.argsort(-y, axis=1)[:, :K]


def run(learning: LookaheadLearning, tokens) -> None:
    for z, z_target, chosen in tokens:
        learning.saw(0, z)
        learning.saw(1, z_target)
        learning.routed(1, chosen)


def recall(w: np.ndarray, truth: np.ndarray, n_embd: int) -> float:
    hits = 0
    for z, _, chosen in stream(n_embd, w, truth, 200, seed=9):
        hits += len(set(np.argsort(-(z @ w)[0])[:K]) & set(chosen[0]))
    return hits / (200 * K)


@pytest.mark.parametrize("n_embd, features", [(32, 256), (64, 16)])
def test_a_next_router_the_plain_guess_misses_is_learned(monkeypatch, n_embd, features):
    """The target routes by `truth`, far from the folded router the plain guess uses. With
    n_embd > FEATURES the correction reads a random projection of z, and the truth differs
    from the plain guess only inside that projection's span (else it could not be learned)."""
    monkeypatch.setattr(lookahead_learning, "FEATURES", features)
    rng = np.random.default_rng(1)
    folded = rng.standard_normal((n_embd, E)).astype(np.float32)
    learning = LookaheadLearning({0: 1}, {0: folded, 1: folded}, K)
    proj = learning.proj
    assert (proj is None) == (n_embd <= features)
    span = np.eye(n_embd, dtype=np.float32) if proj is None else proj
    truth = folded + 3 * span @ rng.standard_normal((span.shape[1], E)).astype(np.float32)
    run(learning, stream(n_embd, folded, truth, 400))
    w = learning.matrix(0)
    assert w is not None and w.shape == (n_embd, E)
    plain, learned = recall(folded, truth, n_embd), recall(w, truth, n_embd)
    assert plain < 0.6 and learned > 0.9, (plain, learned)
    s = learning.stats()["lookahead_learned_0_to_1"]
    assert s["recall_best"] > s["recall_plain"] + 0.3 and s["using"].startswith("lambda")


def test_the_next_tokens_first_layer_is_learned_from_the_end_of_this_one():
    """The first layer of token t+1 routes by z_end(t) @ truth: the pair NEXT_TOKEN -> 0 learns
    it across the token boundary (saw(NEXT_TOKEN) at a token's end, routed(0) in the next)."""
    rng = np.random.default_rng(5)
    n_embd = 32
    folded = rng.standard_normal((n_embd, E)).astype(np.float32)
    truth = rng.standard_normal((n_embd, E)).astype(np.float32)
    learning = LookaheadLearning({NEXT_TOKEN: 0}, {0: folded}, K)
    pinv = np.linalg.pinv(folded)
    end = None
    for _ in range(300):
        if end is None:  # the first token: nothing to learn from yet
            z_first = rng.standard_normal((1, n_embd)).astype(np.float32)
            chosen = np.argsort(-(z_first @ folded), axis=1)[:, :K]
        else:
            y = end @ truth
            z_first, chosen = (y @ pinv).astype(np.float32), np.argsort(-y, axis=1)[:, :K]
        learning.saw(0, z_first)
        learning.routed(0, chosen)
        end = rng.standard_normal((1, n_embd)).astype(np.float32)
        learning.saw(NEXT_TOKEN, end)
    w = learning.matrix(NEXT_TOKEN)
    assert w is not None
    assert recall(w, truth, n_embd) > 0.9 and recall(folded, truth, n_embd) < 0.6
    assert "lookahead_learned_next_token_to_0" in learning.stats()


def test_a_next_token_guess_near_chance_is_not_used():
    """Routing the end of the last token says nothing about: a fit may beat the plain guess
    by a little, but it is not read from (NEXT_TOKEN_MIN_RECALL)."""
    rng = np.random.default_rng(6)
    folded = rng.standard_normal((32, E)).astype(np.float32)
    learning = LookaheadLearning({NEXT_TOKEN: 0}, {0: folded}, K)
    used = 0
    for _ in range(lookahead_learning.RETIRE_AFTER):
        z_first = rng.standard_normal((1, 32)).astype(np.float32)
        learning.saw(0, z_first)
        learning.routed(0, rng.permutation(E)[None, :K])
        learning.saw(NEXT_TOKEN, rng.standard_normal((1, 32)).astype(np.float32))
        used += learning.matrix(NEXT_TOKEN) is not None
    assert used == 0


def test_a_token_run_without_predictions_pairs_with_nothing():
    """After forget_token (the gate's off mode), the last token's rms(x) is not learned from again."""
    rng = np.random.default_rng(7)
    folded = rng.standard_normal((32, E)).astype(np.float32)
    learning = LookaheadLearning({0: 1}, {0: folded, 1: folded}, K)
    learning.saw(0, rng.standard_normal((1, 32)).astype(np.float32))
    learning.saw(1, rng.standard_normal((1, 32)).astype(np.float32))
    learning.routed(1, np.array([[0, 1]]))
    pair = learning.learning[0]
    assert pair._rows == 1
    learning.forget_token()
    learning.routed(1, np.array([[2, 3]]))  # a resting token's routing: no saw() came before it
    assert pair._rows == 1


def test_a_right_plain_guess_is_kept_and_stops_learning():
    rng = np.random.default_rng(2)
    folded = rng.standard_normal((32, E)).astype(np.float32)
    learning = LookaheadLearning({0: 1}, {0: folded, 1: folded}, K)
    run(learning, stream(32, folded, folded, lookahead_learning.RETIRE_AFTER - 16))
    assert learning.matrix(0) is None and learning.stats()["lookahead_learned_0_to_1"]["using"] == "plain"
    run(learning, stream(32, folded, folded, 16, seed=1))
    assert not learning.learning and learning.stats()["lookahead_learned_0_to_1"]["using"] == "plain (retired)"
    assert not learning.wants(1)  # its rms(x) is no longer taken


def test_only_the_worst_pairs_learn(monkeypatch):
    """With more pairs than PAIRS, the ones whose plain guess recalls least are chosen after
    SELECT_AFTER tokens."""
    monkeypatch.setattr(lookahead_learning, "PAIRS", 1)
    rng = np.random.default_rng(3)
    f = {l: rng.standard_normal((32, E)).astype(np.float32) for l in range(3)}
    learning = LookaheadLearning({0: 1, 1: 2}, f, K)
    assert not learning.learning
    rng = np.random.default_rng(4)
    for _ in range(lookahead_learning.SELECT_AFTER + 1):
        z = [rng.standard_normal((1, 32)).astype(np.float32) for _ in range(3)]
        for layer in range(3):
            learning.saw(layer, z[layer])
        # pair 0 -> 1 guessed right (layer 1 routes by z0 @ f[1]), pair 1 -> 2 at random
        learning.routed(1, np.argsort(-(z[0] @ f[1]), axis=1)[:, :K])
        learning.routed(2, rng.permutation(E)[None, :K])
    assert list(learning.learning) == [1]


# -- in a model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


def test_learning_never_changes_tokens_and_fits_the_plan(many):
    budget = share_budget(plan_for(many), 0.25)
    tokens = {}
    for learn in (False, True):
        with Model.load(many, memory_budget=budget, prefetch="always") as m:
            pred = m.transformer.prefetcher.predictor
            if not learn:
                pred.learning = None
            ids = m.tokenize(PROMPT)
            logits, out = m.transformer.forward(np.array(ids)), []
            for _ in range(48):
                out.append(int(np.argmax(logits)))
                logits = m.transformer.forward(np.array(out[-1:]))
            tokens[learn] = out
            if learn:
                pairs = pred.learning.learning  # one per layer after the first, and the next token's
                assert sorted(pairs) == [NEXT_TOKEN, *range(MANY.n_layer - 1)]
                assert all(p.n >= (32 if s == NEXT_TOKEN else 48) for s, p in pairs.items())
                held = sum(w.nbytes for w in pred._w.values()) + sum(
                    a.nbytes for p in pairs.values() for a in [p.gram, p.cross, *p.fits, p._z, p._zt, p._chosen]
                    + ([p.matrix] if p.matrix is not None else []))
                g = GGUFFile(many)
                try:
                    args = arch.model_args(g)
                    with_pred = make_plan(g, args, MANY.n_ctx, 0).overhead
                finally:
                    g.close()
                counted = (lookahead_learning.state_bytes(args.n_embd, args.n_expert, args.n_expert_used)
                           + 4 * args.n_embd * args.n_expert * MANY.n_layer)
                assert held <= counted and with_pred >= counted
    assert tokens[False] == tokens[True]


def test_learning_keeps_within_its_share_of_the_time(monkeypatch):
    """With no time to spare, every batch is dropped unlearned and the plain guess stays."""
    monkeypatch.setattr(lookahead_learning, "SHARE", 0.0)
    rng = np.random.default_rng(1)
    folded = rng.standard_normal((32, E)).astype(np.float32)
    truth = folded + 3 * rng.standard_normal((32, E)).astype(np.float32)
    learning = LookaheadLearning({0: 1}, {0: folded, 1: folded}, K)
    run(learning, stream(32, folded, truth, 4 * lookahead_learning.BATCH))
    pair = learning.learning[0]
    assert pair.n == 0 and pair.dropped == 4 and learning.matrix(0) is None
    monkeypatch.setattr(lookahead_learning, "SHARE", float("inf"))
    run(learning, stream(32, folded, truth, 4 * lookahead_learning.BATCH, seed=1))
    assert pair.n == 4 * lookahead_learning.BATCH
