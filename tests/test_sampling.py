"""The sampler against hand-computed expectations: each filter and penalty on small logits."""
import math

import pytest
import torch

from hybrid.sampling import SamplerState, SamplingParams, apply_penalties, sample


def _state(prompt=(), outputs=(), **kw):
    st = SamplerState(SamplingParams(**kw), list(prompt))
    for t in outputs:
        st.observe(t)
    return st


def _freq(logits, n=4000, **kw):
    st = _state(seed=0, **kw)
    counts = torch.zeros(len(logits))
    for _ in range(n):
        counts[sample(torch.tensor(logits), st)] += 1
    return counts / n


def test_greedy_and_top_k_1():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert sample(logits, _state(temperature=0)) == 1
    assert all(sample(logits, _state(temperature=1.5, top_k=1, seed=s)) == 1 for s in range(20))


def test_temperature_one_follows_softmax():
    logits = [0.0, math.log(3.0)]                   # probabilities 1/4, 3/4
    f = _freq(logits, temperature=1.0)
    assert abs(f[1] - 0.75) < 0.03


def test_top_k_top_p_min_p_cut_the_tail():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert _freq(logits, top_k=2)[2:].sum() == 0
    f = _freq(logits, top_p=0.7)                     # 0.5 + 0.3 reaches 0.7: tokens 0 and 1 remain
    assert f[2:].sum() == 0 and abs(f[0] - 0.5 / 0.8) < 0.03
    f = _freq(logits, min_p=0.35)                    # keeps p >= 0.35 * 0.5 = 0.175: tokens 0 and 1
    assert f[2:].sum() == 0 and f[1] > 0.3


def test_penalties_match_the_formulas():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), _state(prompt=[0], outputs=[1], repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]     # seen tokens: positive / 2, negative * 2
    out = apply_penalties(logits.clone(), _state(outputs=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 - 2 * 0.25, 0.5 - 0.5 - 0.25]


def test_seed_reproducible_and_different_seeds_differ():
    logits = torch.randn(1000)
    a = [sample(logits, st) for st in [_state(seed=7)] for _ in range(30)]
    st = _state(seed=7)
    b = [sample(logits, st) for _ in range(30)]
    st = _state(seed=8)
    c = [sample(logits, st) for _ in range(30)]
    assert a == b and a != c


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                                         ("max_tokens", 0), ("repetition_penalty", 0.0), ("stop", [""]),
                                         ("presence_penalty", 3.0)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
