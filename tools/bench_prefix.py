"""Prefix caching benchmark: N requests that share one long system prompt (2,000 tokens by default), each
with its own short question, run through the engine with prefix caching OFF and ON in the same process.
Reports, per mode and arrival pattern, the prompt tokens actually prefilled (engine.stats), the cached
prompt tokens (RequestOutput.cached_prompt_tokens) and time to first token (mean / max), plus wall time.

Arrival patterns: "concurrent" (all N added at once: the first prefills the shared prompt, the others
wait for its blocks and start from them) and "sequential" (one request after the other, as turns of an
agent). A warm-up request runs first in each engine (numba compile, allocator).

    python tools/bench_prefix.py                     # a tiny synthetic checkpoint written to a temp dir
    python tools/bench_prefix.py MODEL_DIR --requests 8 --system-tokens 2000 --expert-backend auto
Not a test (timings); tests/test_paged_engine.py checks the behaviour.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def run(engine, prompts, sp, concurrent: bool) -> dict:
    outs, t0 = {}, time.perf_counter()
    before = engine.stats["prefill_tokens"]
    pending = list(prompts)
    while pending or engine.has_unfinished():
        if pending and (concurrent or not engine.has_unfinished()):
            batch = pending if concurrent else pending[:1]
            for p in batch:
                outs[engine.add_request(p, sp)] = None
            pending = [] if concurrent else pending[1:]
        for d in engine.step():
            if d.finish_reason is not None:
                outs[d.request_id] = d
    wall = time.perf_counter() - t0
    ttft = [d.metrics["time_to_first_token_s"] for d in outs.values()]
    return {"prefilled_tokens": engine.stats["prefill_tokens"] - before,
            "cached_prompt_tokens": sum(d.cached_prompt_tokens for d in outs.values()),
            "ttft_mean_s": round(statistics.mean(ttft), 4), "ttft_max_s": round(max(ttft), 4),
            "wall_s": round(wall, 3), "tokens": [d.token_ids for d in outs.values()]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", help="checkpoint (default: a tiny synthetic one)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--expert-backend", default="auto")
    ap.add_argument("--max-prefill-tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args(argv)

    from hybrid import LLM, SamplingParams
    from hybrid.engine import Engine
    model_dir = args.model_dir
    if model_dir is None:
        from hybrid.synthetic import write_checkpoint
        model_dir = write_checkpoint(tempfile.mkdtemp(prefix="bench-prefix-"), "tiny", tokenizer=True)
    context = args.system_tokens + args.question_tokens + args.max_tokens + 1
    llm = LLM(model_dir, expert_backend=args.expert_backend, progress=False, max_batch=args.requests,
              max_context=context)
    vocab = min(llm.config.vocab_size, 2048)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, vocab, (args.system_tokens,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (args.question_tokens,), generator=g).tolist()
               for _ in range(args.requests)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    report = {"model_dir": str(model_dir), "expert_backend": llm.expert_backend, "requests": args.requests,
              "system_tokens": args.system_tokens, "question_tokens": args.question_tokens,
              "block_size": args.block_size, "threads": torch.get_num_threads()}
    tokens = {}
    for pattern in ("concurrent", "sequential"):
        for caching in (False, True):
            eng = Engine(llm.model, llm.config, llm.tokenizer, llm.device, llm.dtype, max_batch=args.requests,
                         max_context=context, max_prefill_tokens=args.max_prefill_tokens,
                         block_size=args.block_size, enable_prefix_caching=caching)
            run(eng, [torch.randint(0, vocab, (64,), generator=g).tolist()], sp, True)     # warm-up
            r = run(eng, prompts, sp, pattern == "concurrent")
            tokens[(pattern, caching)] = r.pop("tokens")
            r["preemptions"] = eng.stats["preemptions"]
            report[f"{pattern}/prefix_caching={'on' if caching else 'off'}"] = r
            print(f"{pattern:>10} prefix caching {'on ' if caching else 'off'}: {json.dumps(r)}", flush=True)
    report["same_tokens_on_and_off"] = all(tokens[(p, True)] == tokens[(p, False)]
                                           for p in ("concurrent", "sequential"))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
