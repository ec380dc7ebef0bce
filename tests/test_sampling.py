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


# ---- validation: OpenAI's types and ranges, a ValueError naming the field ---------------------------
TEMPERATURE_MAX = 2.0       # OpenAI's bound, stated in hybrid/sampling.py's docstring
TINY_TEMPERATURES = (1e-40, 1e-300, 5e-324, 9.9e-6)    # below 1e-5: greedy (vLLM's _SAMPLING_EPS)


@pytest.mark.parametrize("field,value", [
    ("temperature", 2 ** 64), ("temperature", 10 ** 400), ("temperature", TEMPERATURE_MAX + 1e-9),
    ("repetition_penalty", 2 ** 64), ("repetition_penalty", 1e-300), ("top_k", 2 ** 64), ("seed", 2 ** 64),
    ("seed", -2 ** 63 - 1), ("max_tokens", 2 ** 64), ("max_tokens", 10 ** 5000), ("logprobs", 21),
    ("logprobs", -1), ("presence_penalty", 2 ** 64), ("top_p", 1e-400),
], ids=lambda v: v if isinstance(v, str) else f"{v:.3g}" if isinstance(v, float) else f"int{v.bit_length()}b")
def test_out_of_range_and_huge_numbers_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} = "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("temperature", True), ("top_p", False), ("top_k", True), ("max_tokens", True), ("seed", False),
    ("logprobs", True), ("temperature", "0.5"), ("top_k", 2.0), ("max_tokens", 3.0), ("seed", 1.5),
    ("temperature", float("nan")), ("top_p", float("inf")), ("min_p", float("-inf")),
    ("frequency_penalty", float("nan")), ("stop", 5), ("stop", ["a", 3]), ("stop_token_ids", "12"),
    ("stop_token_ids", [True]), ("stop_token_ids", [2 ** 64]), ("ignore_eos", 1), ("skip_special_tokens", "no"),
    ("constraint", object()),
])
def test_wrong_types_and_non_finite_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} = "):
        SamplingParams(**{field: value})


def test_edges_of_the_ranges_are_accepted():
    for kw in [dict(temperature=0), dict(temperature=TEMPERATURE_MAX), dict(top_p=1e-300), dict(top_k=-1),
               dict(top_k=2 ** 63 - 1), dict(seed=-2 ** 63), dict(seed=2 ** 64 - 1), dict(max_tokens=2 ** 63 - 1),
               dict(logprobs=0), dict(logprobs=20), dict(repetition_penalty=0.01), dict(repetition_penalty=10),
               dict(presence_penalty=-2, frequency_penalty=2)]:
        p = SamplingParams(**kw)
        assert isinstance(p.temperature, float)
        sample(torch.randn(50), SamplerState(p, [1, 2]))


# ---- the sampler never produces NaN, whatever valid params and hostile logits it gets ----------------
@pytest.mark.parametrize("t", TINY_TEMPERATURES)
def test_tiny_temperatures_are_greedy(t):
    logits = torch.tensor([0.3, 1.0, 0.99999, -5.0])
    assert all(sample(logits, _state(temperature=t, seed=s)) == 1 for s in range(20))


def test_hostile_logits_and_extreme_params_never_fail():
    rng = torch.Generator().manual_seed(0)
    V = 37
    hostile = [torch.full((V,), 3e38), torch.full((V,), -3e38), torch.randn(V, generator=rng) * 1e30]
    for h in hostile[:]:
        h2 = h.clone()
        h2[::3], h2[1::5], h2[2::7] = float("nan"), float("inf"), float("-inf")
        hostile.append(h2)
    params = [dict(temperature=1e-5), dict(temperature=TEMPERATURE_MAX, top_p=1e-300), dict(min_p=1.0),
              dict(repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=-2),
              dict(repetition_penalty=10, presence_penalty=2, frequency_penalty=2, top_k=1),
              dict(top_k=V + 5, top_p=0.5, min_p=0.5, logprobs=20), dict(temperature=0, logprobs=3)]
    for logits in hostile:
        for kw in params:
            st = _state(prompt=range(0, V, 2), outputs=[1, 1, 4], seed=3, **kw)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                big = torch.finfo(dtype).max          # finite values stay finite in this dtype
                x = torch.where(logits.isfinite(), logits.clamp(-big, big), logits).to(dtype)
                tok = sample(x, st)
                assert 0 <= tok < V and not math.isnan(x[tok]) and x[tok] != float("-inf")
            for lp, alts in st.logprobs:
                assert not math.isnan(lp) and all(not math.isnan(v) for _, v in alts)


def test_no_allowed_token_is_a_clear_error():
    with pytest.raises(ValueError, match="-inf or NaN"):
        sample(torch.tensor([float("nan"), float("-inf")]), _state())


def test_top_p_keeps_the_top_token_however_small():
    logits = torch.tensor([1.0, 0.9, 0.8])
    assert all(sample(logits, _state(top_p=1e-300, seed=s)) == 0 for s in range(30))


# ---- logprobs (raw model logits) and constraints -----------------------------------------------------
def test_logprobs_are_of_the_raw_logits():
    """log-softmax of the logits as given: penalties and temperature change the choice, not the logprobs."""
    logits = torch.tensor([0.0, math.log(3.0), float("-inf")])        # probabilities 1/4, 3/4, 0
    st = _state(prompt=[1], temperature=0.3, repetition_penalty=5.0, logprobs=2, seed=0)
    toks = [sample(logits, st) for _ in range(5)]
    assert len(st.logprobs) == 5
    for tok, (lp, alts) in zip(toks, st.logprobs):
        assert lp == pytest.approx(math.log([0.25, 0.75][tok]), abs=1e-6)
        assert [i for i, _ in alts] == [1, 0]
        assert [v for _, v in alts] == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-6)
    st = _state(temperature=0, logprobs=0)
    sample(logits, st)
    assert st.logprobs[0][1] == [] and st.logprobs[0][0] == pytest.approx(math.log(0.75), abs=1e-6)
    assert not _state().logprobs and sample(logits, _state()) in (0, 1)


class _Allow:
    """A constraint that allows a fixed set of tokens and records what it was told."""

    def __init__(self, allowed, fail=False):
        self.allowed, self.fail, self.seen = list(allowed), fail, []

    def mask(self, logits):
        if self.fail:
            raise RuntimeError("grammar broke")
        out = torch.full_like(logits, float("-inf"))
        out[self.allowed] = logits[self.allowed]
        return out

    def advance(self, token):
        self.seen.append(token)


def test_constraint_masks_greedy_and_sampling_and_advances():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.5, 0.0])
    c = _Allow([2, 3])
    st = _state(temperature=0, constraint=c)
    tok = sample(logits, st)
    st.observe(tok)
    assert tok == 2 and c.seen == [2]
    c = _Allow([3, 4])
    st = _state(temperature=TEMPERATURE_MAX, seed=1, constraint=c)
    toks = []
    for _ in range(200):
        toks.append(sample(logits, st))
        st.observe(toks[-1])
    assert set(toks) == {3, 4} and c.seen == toks
    with pytest.raises(RuntimeError, match="grammar broke"):          # the engine fails this sequence alone
        sample(logits, _state(constraint=_Allow([1], fail=True)))
    with pytest.raises(ValueError, match="constraint"):
        sample(logits, _state(constraint=_Allow([])))


# ---- the fast paths: top-p over the top candidates only, inverse-CDF draws ---------------------------
def _top_p_by_full_sort(probs, top_p):
    """The definition: sort everything, keep tokens whose mass strictly above is below top_p (and the top)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, above = set(), 0.0
    for rank, i in enumerate(order):
        if rank == 0 or above < top_p:
            keep.add(i)
        above += probs[i]
    return keep


@pytest.mark.parametrize("V,scale,top_p", [(1001, 8.0, 0.9), (3001, 0.05, 0.95), (40_001, 2.0, 0.5),
                                           (40_001, 0.01, 0.999), (777, 30.0, 1e-9)])
def test_top_p_matches_the_full_sort(V, scale, top_p):
    from hybrid.sampling import _top_p
    g = torch.Generator().manual_seed(V)
    probs = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * scale, 0)
    got = _top_p(probs, top_p)
    kept = set(torch.nonzero(got).flatten().tolist())
    want = _top_p_by_full_sort(probs.tolist(), top_p)
    assert len(kept ^ want) <= 1            # one token may sit exactly on the cut (float sums differ)
    assert torch.equal(got[sorted(kept)], probs[sorted(kept)])


def test_draws_follow_the_probabilities_and_skip_zeros():
    from hybrid.sampling import _draw
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(torch.tensor([_draw(probs, g) for _ in range(n)]), minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs.double(), atol=0.015)      # ~5 sigma at n = 20,000
    assert _draw(torch.tensor([0.0, 0.0, 1e-45]), g) == 2          # a denormal weight alone
