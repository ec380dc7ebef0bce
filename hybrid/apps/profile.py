"""`hybrid profile MODEL_DIR --prompts FILE`: route real prompts and count which experts each layer
picks (hybrid/experts/profile.py RoutingCounter), for `--gpu-experts N`.
Checked by tests/test_hot_experts.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from hybrid.experts.profile import PROFILE_FILE, RoutingCounter
from hybrid.llm import LLM
from hybrid.sampling import SamplingParams


def read_prompts(path: str | Path) -> list:
    """One prompt per line: plain text, or JSON objects with "prompt" (text or ids) or "messages"."""
    prompts = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read it ({e.strerror or e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if "messages" in obj:
                prompts.append({"messages": obj["messages"]})
            elif "prompt" in obj:
                prompts.append(obj["prompt"])
            else:
                raise ValueError(f"{path}:{n}: needs a 'prompt' or 'messages' field")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def profile_routing(llm, prompts: list, max_tokens: int = 16) -> RoutingCounter:
    """Route the prompts (and max_tokens generated tokens each) of `llm` (a hybrid.LLM) and count
    the experts chosen."""
    counter = RoutingCounter(llm.model)
    try:
        ids = [llm.chat_prompt_ids(p["messages"]) if isinstance(p, dict) else llm._prompt_ids(p) for p in prompts]
        llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    finally:
        counter.remove()
    return counter


def cli_profile(argv=None) -> int:
    """`hybrid profile MODEL_DIR --prompts FILE [--max-tokens N] [--output PATH]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="hybrid profile", description="count routed-expert use on real prompts "
                                 "(for --gpu-experts N)")
    ap.add_argument("model_dir")
    ap.add_argument("--prompts", required=True, help="text lines, or JSONL with prompt / messages")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (their routing counts)")
    ap.add_argument("--output", help=f"default: MODEL_DIR/{PROFILE_FILE}")
    ap.add_argument("--expert-backend", default="auto")
    args = ap.parse_args(argv)
    prompts = read_prompts(args.prompts)
    llm = LLM(args.model_dir, expert_backend=args.expert_backend)
    counter = profile_routing(llm, prompts, args.max_tokens)
    out = Path(args.output) if args.output else Path(args.model_dir) / PROFILE_FILE
    out.write_text(json.dumps(counter.to_json()))
    print(f"routed {counter.tokens} tokens of {len(prompts)} prompts; wrote {out}")
    return 0
