"""The paged latent cache (hybrid/model/kv_cache.py) in the model's forward: paged and contiguous caches
give equal float32 logits (torch expert backend) for mixed batches of prompts of different lengths,
sequences spanning many blocks, chunked prefill and batched decode, and a block boundary at every
position of a short prompt; the 8-bit caches' logit error against the bf16 cache on the tiny checkpoints
stays under named bounds; cache_bytes_per_token follows the agreed formula; BlockPool bookkeeping.
"""
from __future__ import annotations

import pytest
import torch

from hybrid import LLM
from hybrid.config import load_config
from hybrid.model.attention import Step
from hybrid.model.kv_cache import BlockPool, LatentCache, PagedLatentCache, cache_bytes_per_token

TOL_PAGED = 1e-6          # paged vs contiguous: the same keys gathered by row instead of sliced (fp32)
# 8-bit cache vs bf16 cache, relative logit error per row (max |diff| / max |logit|) over 52 rows (4 prompts
# + 12 batched decodes) of the tiny random checkpoints, measured 2026-11-29 (mean / max):
#   int8: k2.6 9.3e-3 / 1.5e-2, groups 2.4e-2 / 5.6e-1, deepseek-v3-fp8 2.1e-2 / 5.4e-1, dense2-yarn 5.3e-2 / 4.9e-1
#   fp8:  k2.6 9.1e-2 / 5.8e-1, groups 9.8e-2 / 5.5e-1, deepseek-v3-fp8 9.3e-2 / 5.4e-1, dense2-yarn 1.2e-1 / 6.4e-1
# (for scale: a bf16 cache against an fp32 one gives 3e-3..7e-3 / 5e-3..7e-2). The tails are expert-routing
# flips of the random tiny models (a near-tie in top-k amplifies a small attention error); e4m3 keeps 3
# mantissa bits, int8 ~7 bits of a row's range. Bounds leave ~2x margin on the means.
TOL_INT8_MEAN, TOL_INT8_MAX = 0.1, 1.0
TOL_FP8_MEAN, TOL_FP8_MAX = 0.25, 1.2

def _prompt(n, seed):
    return torch.randint(0, 2048, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, expert_backend="torch", progress=False, max_batch=1, max_context=512)


class PagedRunner:
    """Drives the model over a paged cache by hand: block tables handed out from a shuffled pool."""

    def __init__(self, llm, block_size, num_blocks=400, kv_cache_dtype="auto", seed=0):
        self.model, self.bs = llm.model, block_size
        self.cache = PagedLatentCache(llm.config, num_blocks, block_size, torch.float32, llm.device, kv_cache_dtype)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables, self.lens = {}, {}

    def step(self, chunks: dict) -> torch.Tensor:
        """chunks: seq -> new token ids; returns the logits of each chunk's last row, in dict order."""
        ids, starts, lengths, tables, last = [], [], [], [], []
        for s, toks in chunks.items():
            table, n0 = self.tables.setdefault(s, []), self.lens.get(s, 0)
            while len(table) * self.bs < n0 + len(toks):
                table.append(self.free.pop())
            ids += toks
            starts.append(n0)
            lengths.append(len(toks))
            tables.append(table)
            last.append(len(ids) - 1)
            self.lens[s] = n0 + len(toks)
        step = Step.build(list(range(len(chunks))), starts, lengths, "cpu", tables, self.bs)
        return self.model(torch.tensor(ids), step, self.cache, logits_for=torch.tensor(last))


class ContiguousRunner:
    def __init__(self, llm, slots=8):
        self.model = llm.model
        self.cache = LatentCache(llm.config, slots, 512, torch.float32, llm.device)
        self.lens = {}

    def step(self, chunks: dict) -> torch.Tensor:
        ids, slots, starts, lengths, last = [], [], [], [], []
        for s, toks in chunks.items():
            slots.append(s)
            starts.append(self.lens.get(s, 0))
            lengths.append(len(toks))
            ids += toks
            last.append(len(ids) - 1)
            self.lens[s] = starts[-1] + len(toks)
        step = Step.build(slots, starts, lengths)
        return self.model(torch.tensor(ids), step, self.cache, logits_for=torch.tensor(last))


def _rel(a, b):
    return ((a - b).abs().amax(-1) / b.abs().amax(-1)).max().item()


def _drive(runners, schedule):
    """Run the same schedule on every runner; return the worst relative difference to runners[0]."""
    worst, nxt = 0.0, {}
    for chunks in schedule:
        chunks = {s: (toks if toks is not None else [nxt[s]]) for s, toks in chunks.items()}
        outs = [r.step(chunks) for r in runners]
        worst = max([worst] + [_rel(o, outs[0]) for o in outs[1:]])
        for s, row in zip(chunks, outs[0]):
            nxt[s] = int(row.argmax())
    return worst


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_paged_equals_contiguous_mixed_batch(llm, block_size):
    """Prompts of 1, 5, 37 and 130 tokens (130 = 33 blocks of 4) prefilled together, one of them in two
    chunks; then batched decodes, a new prompt joining mid-way, and more decodes: equal logits."""
    p = {0: _prompt(1, 1), 1: _prompt(5, 2), 2: _prompt(37, 3), 3: _prompt(130, 4), 4: _prompt(23, 5)}
    schedule = [{0: p[0], 1: p[1], 2: p[2][:20], 3: p[3]},
                {0: None, 1: None, 2: p[2][20:], 3: None}]
    schedule += [{0: None, 1: None, 2: None, 3: None}] * 4
    schedule += [{0: None, 1: None, 4: p[4], 2: None, 3: None}]
    schedule += [{0: None, 1: None, 2: None, 3: None, 4: None}] * 4
    worst = _drive([ContiguousRunner(llm), PagedRunner(llm, block_size, seed=block_size)], schedule)
    assert worst < TOL_PAGED, f"paged (block {block_size}) differs from contiguous by {worst:.2e}"


def test_block_boundary_at_every_position_of_a_short_prompt(llm):
    """A 9-token prompt with block sizes 1..9 puts a block boundary after every position; each prompt is
    also split into two prefill chunks at every position; 3 decodes follow. Logits equal the contiguous ones."""
    prompt = _prompt(9, 7)
    worst = 0.0
    for bs in range(1, 10):
        for cut in range(1, 9):
            schedule = [{0: prompt[:cut]}, {0: prompt[cut:]}, {0: None}, {0: None}, {0: None}]
            worst = max(worst, _drive([ContiguousRunner(llm), PagedRunner(llm, bs, num_blocks=20, seed=bs)],
                                      schedule))
    assert worst < TOL_PAGED, worst


def measure_cache_error(llm, fmt, base="bf16", seed=0):
    """(mean, max) over rows of max|logits_fmt - logits_base| / max|logits_base|: four prompts prefilled
    together (5, 17, 33, 70 tokens), then 12 batched decode steps, the same tokens fed to both caches."""
    ref = PagedRunner(llm, 16, kv_cache_dtype=base, seed=seed)
    test = PagedRunner(llm, 16, kv_cache_dtype=fmt, seed=seed)
    chunks = {i: _prompt(n, seed + i) for i, n in enumerate((5, 17, 33, 70))}
    errs = []
    for _ in range(13):
        a, b = ref.step(chunks), test.step(chunks)
        errs += ((b - a).abs().amax(-1) / a.abs().amax(-1)).tolist()
        chunks = {s: [int(row.argmax())] for s, row in zip(chunks, a)}
    return sum(errs) / len(errs), max(errs)


@pytest.mark.parametrize("variant", ["k2.6", "groups", "deepseek-v3-fp8", "dense2-yarn"])
@pytest.mark.parametrize("fmt,mean_tol,max_tol", [("int8", TOL_INT8_MEAN, TOL_INT8_MAX),
                                                  ("fp8", TOL_FP8_MEAN, TOL_FP8_MAX)])
def test_8bit_cache_logit_error_against_bf16(checkpoint_dir, variant, fmt, mean_tol, max_tol):
    llm = LLM(checkpoint_dir(variant), expert_backend="torch", progress=False, max_batch=1, max_context=256)
    mean, worst = measure_cache_error(llm, fmt)
    print(f"{variant} {fmt}: mean {mean:.2e} max {worst:.2e}")
    assert mean < mean_tol and worst < max_tol, f"{variant} {fmt}: mean {mean:.2e}, max {worst:.2e}"


def test_cache_bytes_per_token_formula(tiny_dir):
    """Per token per layer: bf16 (R + P) * 2 bytes; 8-bit (R + P) + 8 (two fp32 scales); the pool agrees."""
    c = load_config(tiny_dir)
    width, L = c.kv_lora_rank + c.qk_rope_head_dim, c.num_hidden_layers
    assert cache_bytes_per_token(c, "bf16") == width * 2
    assert cache_bytes_per_token(c, "auto", torch.float32) == width * 4
    assert cache_bytes_per_token(c, "fp8") == cache_bytes_per_token(c, "int8") == width + 8
    k26 = load_config(__import__("pathlib").Path(__file__).parent / "fixtures" / "kimi-k2.6")
    assert cache_bytes_per_token(k26, "bf16") == 576 * 2 and cache_bytes_per_token(k26, "fp8") == 584
    for dt in ("bf16", "int8", "fp8"):
        cache = PagedLatentCache(c, 6, 16, torch.float32, torch.device("cpu"), dt)
        assert cache.nbytes == 6 * 16 * L * cache_bytes_per_token(c, dt) == 6 * 16 * cache.bytes_per_token
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cache_bytes_per_token(c, "int4")


def test_block_pool_lru_and_sharing():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.register(a[0], b"root", (1, 2), (), b"k0")
    pool.register(a[1], b"k0", (3,), (), None)               # partial
    pool.acquire(a[0])                                       # shared by a second sequence
    pool.release(a)
    assert pool.free_count() == 3 and pool.longest_prefix([b"k0", b"k1"]) == [a[0]]
    assert pool.best_partial(b"k0", [3, 9], lambda n: ()) == (a[1], 1)
    pool.release([a[0]])
    assert pool.free_count() == 4 and pool.cached_count() == 2
    got = pool.allocate(3)                                   # 2 empty, then the LRU one: the partial block
    assert a[1] in got and pool.best_partial(b"k0", [3], lambda n: ()) == (-1, 0)
    assert pool.longest_prefix([b"k0"]) == [a[0]]
    pool.allocate(1)                                         # evicts the last cached block
    assert pool.longest_prefix([b"k0"]) == [] and pool.free_count() == 0
