"""Advice of the memory plan (hybrid/plan/__init__.py): how many tokens of KV cache fit, which memory is
short and its largest parts, and the smallest changes of options that make a plan fit: the fewest options
changed (8-bit GPU weights, an 8-bit KV cache, an INT4 expert backend; the context, batch or hot experts
closest to the asked ones), each checked by planning again. default_max_context: the context chat and
serve use when none is given. Tests: tests/test_plan.py.
"""
from __future__ import annotations

import itertools

from hybrid.config import ModelConfig
from hybrid.plan import FLAGS, MIN_CONTEXT, Plan, PlanError, _gb, format_plan, kv_cache_bytes, make_plan


def advise_plan(config, plan: Plan) -> None:
    """Fill plan.cache_room, and when it does not fit plan.problem, plan.suggestions and plan.advice."""
    plan.cache_room = {kind: cache_room(config, plan, kind) for kind in ("bf16", "8-bit")}
    if not plan.fits:
        plan.problem = _problem(plan)
        plan.suggestions = _suggestions(config, plan)
        plan.advice = [plan.problem] + [s["text"] for s in plan.suggestions]
        if not plan.suggestions:
            plan.advice.append("no change of these options makes it fit: " + _floor(config, plan))


def _replan(config, plan: Plan, **changes) -> Plan:
    kw = dict(gpu_mem_bytes=plan.gpu_mem_bytes, ram_bytes=plan.ram_bytes, context=plan.context, batch=plan.batch,
              gpu_weights=plan.gpu_weights, gpu_experts=plan.gpu_experts, expert_backend=plan.expert_backend,
              kv_cache_dtype=plan.kv_cache_dtype, cpu_weights=plan.cpu_weights)
    kw.update(changes)
    return make_plan(config, advise=False, **kw)


def cache_room(config, plan: Plan, kind: str = "bf16") -> int:
    """Tokens of KV cache (all sequences together) the memory left by everything else holds, with a
    bf16 or an 8-bit cache (kind "bf16" | "8-bit"); 0 if nothing is left."""
    dtype = "fp8" if kind == "8-bit" else "bf16"
    other = _replan(config, plan, context=1, kv_cache_dtype=dtype)
    per_tok = kv_cache_bytes(config, 1, 1, dtype)
    if plan.on_gpu:
        left = plan.gpu_mem_bytes - (other.gpu_total_bytes - other.kv_cache_bytes)
    else:
        left = plan.ram_bytes - (other.ram_total_bytes - other.kv_cache_bytes)
    return max(0, left // per_tok)


def _problem(plan: Plan) -> str:
    """Which memory is short, by how much, and its parts largest first."""
    out = []
    if plan.on_gpu and not plan.fits_gpu:
        parts = {"accelerator-side weights": plan.gpu_weights_bytes - plan.gpu_expert_bytes,
                 f"hot experts ({plan.gpu_experts})": plan.gpu_expert_bytes,
                 f"KV cache ({plan.context} tokens x {plan.batch})": plan.kv_cache_bytes,
                 "streaming buffers": plan.stream_buffer_bytes, "reserve": plan.gpu_reserve_bytes}
        out.append(_short("GPU", plan.gpu_total_bytes, plan.gpu_mem_bytes, parts))
    if not plan.fits_ram:
        parts = {"routed experts": plan.cpu_expert_bytes, "pinned buffers": plan.pinned_bytes,
                 "reserve": plan.ram_reserve_bytes}
        if not plan.on_gpu:
            parts.update({"accelerator-side weights": plan.gpu_weights_bytes,
                          f"KV cache ({plan.context} tokens x {plan.batch})": plan.kv_cache_bytes})
        out.append(_short("RAM", plan.ram_total_bytes, plan.ram_bytes, parts))
    return "; ".join(out)


def _short(where: str, need: int, has: int, parts: dict) -> str:
    ranked = sorted(((n, name) for name, n in parts.items() if n), reverse=True)
    biggest = ranked[0][1]
    alone = parts[biggest] > has
    return (f"{where}: needs {_gb(need)}, has {_gb(has)} ({_gb(need - has)} short); "
            + (f"the {biggest} alone ({_gb(parts[biggest])}) need more than that" if alone else
               f"largest parts: " + ", ".join(f"{name} {_gb(n)}" for n, name in ranked[:3])))


def _largest(lo: int, hi: int, ok) -> int | None:
    """Largest v in [lo, hi] with ok(v), ok monotone (true then false); None if ok(lo) is false."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _smallest(lo: int, hi: int, ok) -> int | None:
    """Smallest v in [lo, hi] with ok(v), ok monotone (false then true); None if ok(hi) is false."""
    if hi < lo or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def _numeric(config, plan: Plan, base: dict) -> list[dict]:
    """On top of `base`, the one number (context, batch, hot experts) closest to the asked one that fits."""
    fits = lambda **kw: _replan(config, plan, **base, **kw).fits  # noqa: E731
    out = []
    step = MIN_CONTEXT if config.max_position_embeddings >= 8 * MIN_CONTEXT else 256
    lo_ctx = min(MIN_CONTEXT, config.max_position_embeddings)
    if plan.context > lo_ctx:
        k = _largest(lo_ctx // step, (plan.context - 1) // step, lambda k: fits(context=max(k * step, lo_ctx)))
        if k is not None:
            out.append({"context": max(k * step, lo_ctx)})
    if plan.batch > 1:
        b = _largest(1, plan.batch - 1, lambda b: fits(batch=b))
        if b is not None:
            out.append({"batch": b})
    if plan.on_gpu:
        n_all = config.num_moe_layers * config.n_routed_experts
        if plan.gpu_experts > 0:
            n = _largest(0, plan.gpu_experts - 1, lambda n: fits(gpu_experts=n))
            if n is not None:
                out.append({"gpu_experts": n})
        if not plan.fits_ram and plan.gpu_experts < n_all:
            n = _smallest(plan.gpu_experts + 1, n_all, lambda n: fits(gpu_experts=n))
            if n is not None:
                out.append({"gpu_experts": n})
    return out


def _suggestions(config, plan: Plan) -> list[dict]:
    """The fewest options changed that make it fit: every single change that fits, else every pair, ...
    Switches: 8-bit GPU weights, an 8-bit KV cache, an INT4 expert backend; numbers: context, batch,
    hot experts (each the closest to the asked value that fits, on top of the switches). Each
    suggestion is checked by planning again."""
    switches = []
    if plan.gpu_weights == "bf16":
        switches.append({"gpu_weights": "int8"})
    if plan.kv_cache_dtype not in ("fp8", "int8"):
        switches.append({"kv_cache_dtype": "fp8"})
    if plan.expert_backend not in ("numba", "kt"):
        switches.append({"expert_backend": "numba"})
    merge = lambda combo: {k: v for d in combo for k, v in d.items()}  # noqa: E731
    for level in range(1, len(switches) + 2):         # options changed
        found = [merge(c) for c in itertools.combinations(switches, level) if _replan(config, plan, **merge(c)).fits]
        for combo in itertools.combinations(switches, level - 1):
            base = merge(combo)
            found += [{**base, **num} for num in _numeric(config, plan, base)]
        if found:
            return [_suggestion(config, plan, c) for c in found]
    return []


def _suggestion(config, plan: Plan, changes: dict) -> dict:
    new = _replan(config, plan, **changes)
    assert new.fits, changes
    flags = " ".join(f"{FLAGS[k]} {v}" for k, v in changes.items())
    what = []
    if "gpu_weights" in changes:
        what.append(f"weights {_gb(plan.gpu_weights_bytes)} -> {_gb(new.gpu_weights_bytes)}")
    if "kv_cache_dtype" in changes or "context" in changes or "batch" in changes:
        what.append(f"KV cache {_gb(plan.kv_cache_bytes)} -> {_gb(new.kv_cache_bytes)}")
    if "gpu_experts" in changes:
        what.append(f"{new.gpu_experts} hot experts on the GPU ({_gb(new.gpu_expert_bytes)})")
    if "expert_backend" in changes:
        what.append(f"routed experts {_gb(plan.cpu_expert_bytes)} -> {_gb(new.cpu_expert_bytes)} (INT4)")
    totals = (f"GPU {_gb(new.gpu_total_bytes)} of {_gb(new.gpu_mem_bytes)}, " if new.on_gpu else "") + \
        f"RAM {_gb(new.ram_total_bytes)} of {_gb(new.ram_bytes)}"
    return {"changes": changes, "flags": flags, "text": f"{flags} fits ({'; '.join(what)}; {totals})"}


def _floor(config, plan: Plan) -> str:
    """What the smallest settings still need, for the no-suggestion case."""
    low = _replan(config, plan, context=min(MIN_CONTEXT, config.max_position_embeddings), batch=1,
                  gpu_weights="int8", kv_cache_dtype="fp8", expert_backend="numba",
                  gpu_experts=0)
    need = f"{_gb(low.ram_total_bytes)} of RAM" + (f" and {_gb(low.gpu_total_bytes)} of GPU memory"
                                                   if low.on_gpu else "")
    return (f"even with 8-bit weights and cache, context {low.context}, batch 1, it needs {need} "
            f"(the routed experts alone {_gb(low.cpu_expert_bytes)})")


def default_max_context(config: ModelConfig, gpu_mem_bytes: int, ram_bytes: int, *, batch: int = 1,
                        gpu_weights: str = "bf16", gpu_experts: int = 0, expert_backend: str = "numba",
                        kv_cache_dtype: str = "auto", cpu_weights: str = "auto") -> int:
    """The context chat / serve use when none is given (vLLM's max_model_len default, bounded by memory):
    the model's maximum if it fits, else the longest multiple of 256 tokens whose plan fits with
    `batch` sequences (the cache is allocated batch x context). Raises PlanError if even
    min(MIN_CONTEXT, the model's maximum) does not fit."""
    top = config.max_position_embeddings
    kw = dict(gpu_mem_bytes=gpu_mem_bytes, ram_bytes=ram_bytes, batch=batch, gpu_weights=gpu_weights,
              gpu_experts=gpu_experts, expert_backend=expert_backend, kv_cache_dtype=kv_cache_dtype,
              cpu_weights=cpu_weights, advise=False)
    if make_plan(config, context=top, **kw).fits:
        return top
    lo = min(MIN_CONTEXT, top)
    k = _largest(1, top // 256, lambda k: make_plan(config, context=k * 256, **kw).fits)
    if k is None or k * 256 < lo:
        kw.pop("advise")
        raise PlanError(format_plan(make_plan(config, context=lo, **kw)))
    return k * 256
