"""The engine over the paged cache (hybrid/engine.py): prefix hits across requests (whole blocks and the
copied leading tokens of a block; concurrent requests with one system prompt prefill it once), the same
greedy tokens as with prefix caching off; preemption when 64 concurrent requests outgrow a small pool
(all finish, the same tokens as with a large pool, preemptions counted, every block freed); per-sequence
error isolation; logprobs per delta; image embeddings (MediaSpan) passed for the rows of each prefill
chunk and keyed into the prefix cache.
"""
from __future__ import annotations

import pytest
import torch

import hybrid.engine as engine_mod
from hybrid import LLM, SamplingParams
from hybrid.engine import Engine, MediaSpan

GREEDY = dict(temperature=0, ignore_eos=True)


def _prompt(n, seed):
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, expert_backend="torch", progress=False, max_batch=4, max_context=256)


def _engine(llm, **kw):
    args = dict(max_batch=8, max_context=256, block_size=16)
    args.update(kw)
    return Engine(llm.model, llm.config, llm.tokenizer, llm.device, llm.dtype, **args)


def _run(eng, prompts, sp, media=None):
    """Generate with `eng` (all requests added at once); outputs in order, tokens and last delta."""
    rids = [eng.add_request(p, sp, media=(media or {}).get(i)) for i, p in enumerate(prompts)]
    toks, last = {r: [] for r in rids}, {}
    while eng.has_unfinished():
        for d in eng.step():
            toks[d.request_id] += d.token_ids
            last[d.request_id] = d
    return [toks[r] for r in rids], [last[r] for r in rids]


def test_prefix_hit_across_requests_whole_blocks_and_copied_tokens(llm):
    eng, sp = _engine(llm), SamplingParams(max_tokens=6, **GREEDY)
    a = _prompt(100, 1)
    _run(eng, [a], sp)
    b = a[:70] + _prompt(9, 2)                     # 4 whole blocks of 16 shared, then 6 tokens of the 5th
    (toks,), (out,) = _run(eng, [b], sp)
    assert out.cached_prompt_tokens == 70 and out.metrics["prefill_tokens"] == 9
    off = _engine(llm, enable_prefix_caching=False)
    (want,), (out_off,) = _run(off, [b], sp)
    assert toks == want and out_off.cached_prompt_tokens == 0
    (again,), (out2,) = _run(eng, [a], sp)          # whole prompt cached: one token is still prefilled
    assert out2.cached_prompt_tokens == 99
    assert eng.pool.used_count() == 0 and eng.stats["prefix_hit_tokens"] >= 70 + 99


def test_concurrent_requests_with_one_system_prompt_prefill_it_once(llm):
    system = _prompt(80, 3)
    prompts = [system + _prompt(5 + i, 10 + i) for i in range(5)]
    sp = SamplingParams(max_tokens=4, **GREEDY)
    on, off = _engine(llm), _engine(llm, enable_prefix_caching=False)
    got, outs = _run(on, prompts, sp)
    want, _ = _run(off, prompts, sp)
    assert got == want
    assert sum(o.cached_prompt_tokens for o in outs) == 4 * 80
    assert on.stats["prefill_tokens"] < off.stats["prefill_tokens"] - 3 * 80


def test_64_concurrent_requests_with_a_small_pool_all_finish(llm):
    """max_batch 64, a pool of 320 tokens (20 blocks of 16) for prompts of 5..40 tokens + 16 generated:
    the newest sequences are preempted and recomputed; every request finishes with the tokens a large
    pool gives, and all blocks come back."""
    prompts = [_prompt(5 + (7 * i) % 36, 100 + i) for i in range(64)]
    sp = SamplingParams(max_tokens=16, **GREEDY)
    small = _engine(llm, max_batch=64, max_context=128, cache_tokens=320)
    big = _engine(llm, max_batch=64, max_context=128, cache_tokens=64 * 128)
    got, outs = _run(small, prompts, sp)
    want, _ = _run(big, prompts, sp)
    assert all(o.finish_reason == "length" for o in outs) and all(len(t) == 16 for t in got)
    assert small.stats["preemptions"] > 0 and big.stats["preemptions"] == 0
    same = sum(g == w for g, w in zip(got, want))
    assert same == 64, f"{64 - same} of 64 requests differ after preemption"
    assert small.pool.used_count() == 0 and small.stats["blocks_total"] == 20


def test_pool_smaller_than_one_context_is_refused(llm):
    with pytest.raises(ValueError, match="max_context"):
        _engine(llm, max_context=256, cache_tokens=128)


def test_an_error_in_one_sequence_ends_that_sequence_only(llm, monkeypatch):
    real, victim = engine_mod.sample, [None]

    def sample(logits, state):
        if state is victim[0]:
            raise RuntimeError("constraint exploded")
        return real(logits, state)
    monkeypatch.setattr(engine_mod, "sample", sample)
    eng, sp = _engine(llm), SamplingParams(max_tokens=5, **GREEDY)
    rids = [eng.add_request(_prompt(9, 6), sp), eng.add_request(_prompt(7, 5), sp), eng.add_request(_prompt(4, 7), sp)]
    victim[0] = eng.waiting[1].sampler
    outs = {}
    while eng.has_unfinished():
        for d in eng.step():
            outs.setdefault(d.request_id, []).append(d)
    err = outs[rids[1]][-1]
    assert err.finish_reason == "error" and "constraint exploded" in err.error and err.token_ids == []
    for r in (rids[0], rids[2]):
        assert outs[r][-1].finish_reason == "length" and sum(len(d.token_ids) for d in outs[r]) == 5
        assert outs[r][-1].error is None
    assert eng.pool.used_count() == 0


def test_logprobs_per_delta(llm):
    eng = _engine(llm)
    sp = SamplingParams(max_tokens=5, logprobs=2, **GREEDY)
    rid = eng.add_request(_prompt(12, 8), sp)
    deltas = []
    while eng.has_unfinished():
        deltas += [d for d in eng.step() if d.request_id == rid]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    entries = sum((d.logprobs for d in deltas), [])
    assert len(entries) == 5 and all(len(alts) == 2 for _, alts in entries)
    tokens = sum((d.token_ids for d in deltas), [])
    assert all(alts[0][0] == t for (_, alts), t in zip(entries, tokens))       # greedy: the best is chosen
    plain = eng.add_request(_prompt(12, 8), SamplingParams(max_tokens=2, **GREEDY))
    while eng.has_unfinished():
        assert all(d.logprobs is None for d in eng.step() if d.request_id == plain)


def test_media_rows_reach_the_model_per_chunk_and_key_the_prefix_cache(llm, monkeypatch):
    """Two spans in a 60-token prompt prefilled in chunks of 16: each row's embedding arrives exactly once,
    at the packed row of its token; generation equals a full recompute with the same embeddings; the same
    tokens with another image key get no prefix hit, with the same key they do."""
    D = llm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    spans = [MediaSpan(5, torch.randn(10, D, generator=g), "img-a"), MediaSpan(30, torch.randn(20, D, generator=g),
                                                                            "img-b")]
    prompt = _prompt(60, 9)
    seen, real = [], llm.model.forward

    def forward(ids, step, cache=None, *a, embeds=None, **kw):
        if embeds is not None:
            rows, values = embeds
            pos = step.positions[rows]                          # prompt position of each replaced row
            seen.extend(zip(pos.tolist(), values))
        return real(ids, step, cache, *a, embeds=embeds, **kw)
    monkeypatch.setattr(llm.model, "forward", forward)
    eng, sp = _engine(llm, max_prefill_tokens=16), SamplingParams(max_tokens=4, **GREEDY)
    (toks,), (out,) = _run(eng, [prompt], sp, media={0: spans})
    assert sorted(p for p, _ in seen) == list(range(5, 15)) + list(range(30, 50))
    for p, v in seen:
        m = spans[0] if p < 30 else spans[1]
        assert torch.equal(v, m.embeds[p - m.start])
    rows = torch.cat([torch.arange(m.start, m.start + m.embeds.shape[0]) for m in spans])
    vals = torch.cat([m.embeds for m in spans])
    seq = list(prompt)
    for t in toks:
        logits = real(torch.tensor(seq), engine_mod.Step.single(len(seq)), embeds=(rows, vals))
        assert int(logits[-1].argmax()) == t
        seq.append(t)
    other = [MediaSpan(5, spans[0].embeds, "img-a"), MediaSpan(30, spans[1].embeds, "img-c")]
    _, (o2,) = _run(eng, [prompt], sp, media={0: other})
    # the first block only: the second (16..31) holds the other image, and a cached block with an image
    # beyond the shared tokens is not copied from (conservative)
    assert o2.cached_prompt_tokens == 16
    _, (o3,) = _run(eng, [prompt], sp, media={0: spans})
    assert o3.cached_prompt_tokens == 59


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_8bit_cache_through_the_engine(llm, fmt):
    """An 8-bit pool: the size of the agreed formula; generation with chunked prefill, batched decode and a
    prefix hit runs to the end, and the first greedy token (a prefill over the 8-bit keys) mostly agrees
    with the full-precision cache (exact agreement is not required: the tiny model's logits are close)."""
    from hybrid.model.kv_cache import cache_bytes_per_token
    eng = _engine(llm, kv_cache_dtype=fmt, max_prefill_tokens=32)
    L = llm.config.num_hidden_layers
    assert eng.cache.nbytes == eng.stats["blocks_total"] * 16 * L * cache_bytes_per_token(llm.config, fmt)
    prompts = [_prompt(n, 40 + n) for n in (3, 50, 90)]
    sp = SamplingParams(max_tokens=6, **GREEDY)
    got, outs = _run(eng, prompts + [prompts[2][:70] + [5]], sp)
    assert all(o.finish_reason == "length" for o in outs) and outs[3].cached_prompt_tokens >= 64
    want, _ = _run(_engine(llm), prompts, sp)
    assert sum(g[0] == w[0] for g, w in zip(got, want)) >= 2
    assert eng.pool.used_count() == 0
