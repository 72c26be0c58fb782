"""The prefetch gate: decoding tokens prefetch while that measures faster than not, and the
mode never changes a token."""

from __future__ import annotations

import numpy as np
import pytest

from offload import Model
from offload import prefetch_gate
from offload.prefetch_gate import PrefetchGate

from test_predict import MANY, PROMPT, plan_for, share_budget

W, FIRST, EVERY = PrefetchGate.WINDOW, len(PrefetchGate.FIRST), PrefetchGate.EXPLORE_EVERY


class Clock:
    """A fake perf_counter: each token takes the seconds its mode costs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def run(gate: PrefetchGate, clock: Clock, tokens: int, cost) -> list[bool]:
    """Decode `tokens` fake tokens; cost(on, i) their seconds. Returns each token's mode."""
    modes = []
    for i in range(tokens):
        on = gate.on
        gate.start_token()
        clock.now += cost(on, i)
        gate.end_token()
        modes.append(on)
    return modes


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(prefetch_gate, "time", c)
    return c


@pytest.mark.parametrize("faster", [True, False])
def test_the_faster_mode_runs_and_the_slower_is_retried_now_and_then(clock, faster):
    gate = PrefetchGate()
    modes = run(gate, clock, W * (1 + FIRST + 3 * (EVERY + 1)), lambda on, i: 0.01 if on == faster else 0.013)
    windows = [modes[i * W : (i + 1) * W] for i in range(len(modes) // W)]
    assert all(len(set(w)) == 1 for w in windows)  # a window runs in one mode
    first = [w[0] for w in windows[: 1 + FIRST]]
    assert first == [True, True, False, False, True]  # warm-up, then on, off, off, on
    after = [w[0] for w in windows[1 + FIRST :]]
    assert after == ([faster] * EVERY + [not faster]) * 3  # one window in EVERY + 1 retries the slower
    assert gate.seconds[faster] == pytest.approx(0.01) and gate.seconds[not faster] == pytest.approx(0.013)
    assert gate.advantage == pytest.approx(0.003 if faster else -0.003)
    assert gate.tokens == {True: modes.count(True), False: modes.count(False)}


def test_a_drift_does_not_decide(clock):
    """Tokens get 3 ms faster window by window while the slots fill (six windows), and
    prefetching saves 1 ms: on, off, off, on cancels the drift out of the mean and finds the
    1 ms (on, off, on, off would credit off with 3 ms of drift and choose it). The drift
    makes the first two comparisons disagree (-2 ms, +4 ms), so prefetching waits for the
    retries to bring the mean above its standard error."""
    gate = PrefetchGate()
    modes = run(gate, clock, W * (1 + FIRST + 6 * (EVERY + 1)),
                lambda on, i: 0.04 - 0.003 * min(i // W, 6) - (0.001 if on else 0.0))
    first = modes[W * (1 + FIRST) : W * (1 + FIRST + EVERY)]
    assert not any(first)  # the noisy start: off
    assert gate.advantage == pytest.approx(0.001, abs=5e-4)
    assert modes[-W * EVERY :].count(False) <= W  # then on, but for a retry of off


def test_a_saving_within_the_noise_is_mostly_not_taken(clock):
    """Prefetching saves 0.2 ms a token, but windows vary by +-3 ms: over ten noise draws it
    runs little more than its retries (measured 23% of the windows, retries 12.5%; taking the
    mean's sign alone, 61%)."""
    import random

    windows = 8 * (EVERY + 1)
    on = 0
    for seed in range(10):
        rng = random.Random(seed)
        gate = PrefetchGate()
        noise = {}

        def cost(prefetching, i):
            w = i // W
            if w not in noise:
                noise[w] = rng.uniform(-0.003, 0.003)
            return 0.03 + noise[w] - (0.0002 if prefetching else 0.0)

        modes = run(gate, clock, W * (1 + FIRST + windows), cost)
        on += modes[W * (1 + FIRST) :].count(True) // W
    assert on / (10 * windows) <= 0.35


def test_the_gate_follows_a_change(clock):
    """Prefetch loses at first (a cold start, say), then pays: the retries find out, once the
    recent comparisons' mean clears its standard error (five of eight here)."""
    gate = PrefetchGate()
    change = W * (1 + FIRST + EVERY + 1)
    modes = run(gate, clock, change + W * 8 * (EVERY + 1),
                lambda on, i: (0.013 if on else 0.01) if i < change else (0.005 if on else 0.01))
    assert modes[change - 2 * W] is False and modes[change - W] is True  # before: off, then its retry of on
    tail = modes[-2 * W * (EVERY + 1) :]
    assert tail.count(False) == 2 * W  # after: on, but for one retry of off in every EVERY + 1 windows


def test_a_gate_that_is_not_adaptive_stays_on(clock):
    gate = PrefetchGate(adaptive=False)
    assert all(run(gate, clock, 10 * W, lambda on, i: 0.02 if on else 0.01))
    assert gate.stats()["prefetch_on_tokens"] == 10 * W and "prefetch_on_seconds_per_token" not in gate.stats()


# -- in a model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many(model_factory):
    return str(model_factory(MANY, "Q8_0", 3))


def test_a_resting_token_makes_no_predictions_and_tokens_never_change(many, monkeypatch):
    """Off-mode decoding tokens skip the predictor (and so every prefetch read); tokens equal
    those without prefetching and with it always on."""
    budget = share_budget(plan_for(many), 0.25)
    n = W * (1 + FIRST + 2)
    tokens = {}
    for mode in (False, "always", True):
        with Model.load(many, memory_budget=budget, prefetch=mode) as m:
            ids = m.tokenize(PROMPT)
            calls = []
            if mode:
                pre = m.transformer.prefetcher
                predict = pre.predictor.predict
                pre.predictor.predict = lambda layer, x: calls.append(len(x)) or predict(layer, x)
            logits, out = m.transformer.forward(np.array(ids)), []
            calls.clear()  # the prompt's
            for _ in range(n):  # greedy, EOS or not
                out.append(int(np.argmax(logits)))
                logits = m.transformer.forward(np.array(out[-1:]))
            tokens[mode] = out
            if not mode:
                continue
            st = m.stats()
            decoding = len(calls)
            on = st["prefetch_on_tokens"]
            assert st["prefetch_on_tokens"] + st["prefetch_off_tokens"] == n
            assert decoding == on * MANY.n_layer
            if mode == "always":
                assert on == n and not st["prefetch_adaptive"]
            else:  # windows 3 and 4 rest, whatever the timings say
                assert st["prefetch_off_tokens"] >= 2 * W and st["prefetch_adaptive"]
    assert tokens[False] == tokens["always"] == tokens[True]


def test_load_refuses_an_unknown_prefetch_mode(many):
    from offload.errors import OffloadError

    with pytest.raises(OffloadError, match="prefetch="):
        Model.load(many, memory_budget=share_budget(plan_for(many), 0.25), prefetch="sometimes")
