"""Routed experts on the accelerator: hot experts and long-prefill streaming.

Hot experts: routing frequency per (layer, expert) counted on real prompts, and the N most used
routed experts kept on the accelerator (INT4, gpu_kernels.int4_matmul) while the rest stay on the CPU.
Streaming: when a layer sees many tokens, the cost model of hybrid/expert_streaming.py may decide
to copy the experts the step routes to (read from the checkpoint's memory map) to the accelerator
in double-buffered chunks and multiply there instead of on the CPU (hybrid/expert_streamer.py);
`expert_streaming="always"` forces it (the same code runs on the CPU, which is how tests check it).

  hybrid profile MODEL_DIR --prompts FILE     -> MODEL_DIR/routing_profile.json (or --output)
  hybrid chat|serve|batch MODEL_DIR --gpu-experts N     (LLM(..., gpu_experts=N))

`HotExperts` wraps one MoE layer's expert scheduler behind the same submit/wait interface: the
assignments of hot experts are taken out of the CPU's work (replaced by a zero-weight duplicate of
one of the token's cold experts, so the CPU kernels keep their fixed top-k shape and read no extra
expert), the CPU starts on the rest, and the accelerator computes the hot ones meanwhile.
Checked by tests/test_hot_experts.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import expert_streamer
from .expert_streamer import add_int4_expert
from .loader import expert_int4

PROFILE_FILE = "routing_profile.json"


class RoutingCounter:
    """Counts the experts every router picks while enabled (a forward hook on each Router)."""

    def __init__(self, model):
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self._handles = []
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.counts[i] = torch.zeros(gate.weight.shape[0], dtype=torch.long)
                self._handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(module, args, output):
            ids = output[0].cpu()
            self.counts[layer] += torch.bincount(ids.flatten(), minlength=self.counts[layer].numel())
            if layer == min(self.counts):
                self.tokens += ids.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "layers": {str(i): c.tolist() for i, c in self.counts.items()}}


def load_profile(path: str | Path) -> dict[int, torch.Tensor]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {int(k): torch.tensor(v, dtype=torch.long) for k, v in data["layers"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a routing profile written by `hybrid profile` ({e})") from None


def choose_hot(profile: dict[int, torch.Tensor], n: int) -> dict[int, list[int]]:
    """The n most used (layer, expert) pairs overall, as {layer: [experts]}."""
    pairs = [(int(c), layer, e) for layer, counts in profile.items() for e, c in enumerate(counts.tolist())]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    hot: dict[int, list[int]] = {}
    for _, layer, e in pairs[:n]:
        hot.setdefault(layer, []).append(e)
    return {layer: sorted(es) for layer, es in hot.items()}


class HotExperts:
    """Routed experts of one layer split between the accelerator (hot) and the CPU scheduler (the rest)."""

    def __init__(self, cpu, hot: dict[int, tuple], device: torch.device, num_experts: int,
                 layer: int = -1, policy=None, fetch=None):
        """hot: expert -> (gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale) as stored.
        policy / fetch: a StreamingPolicy and `fetch(e)` giving an expert's stored tensors, for streaming."""
        self.cpu, self.device, self.layer, self.policy, self.fetch = cpu, device, layer, policy, fetch
        self.weights = {e: tuple(t.to(device) for t in ws) for e, ws in hot.items()}
        self._streamed = False
        self.is_hot = torch.zeros(num_experts, dtype=torch.bool)
        self.is_hot[list(hot)] = True
        self._hot_out = None

    def __getattr__(self, name):
        return getattr(self.cpu, name)

    @property
    def nbytes_gpu(self) -> int:
        return sum(t.numel() * t.element_size() for ws in self.weights.values() for t in ws)

    def split(self, ids: torch.Tensor, weights: torch.Tensor):
        """CPU ids/weights with hot assignments replaced by a zero-weight copy of a cold one."""
        hot = self.is_hot[ids.cpu()].to(ids.device)                       # [T, K]
        if not hot.any():
            return ids, weights, hot
        cold_first = torch.where(hot, ids.new_full((), 2**62), ids).min(dim=1, keepdim=True).values
        cold_first = torch.where(cold_first == 2**62, ids[:, :1], cold_first)  # every expert hot: any id, weight 0
        return torch.where(hot, cold_first, ids), torch.where(hot, 0.0, weights), hot

    def _hot_forward(self, x, ids, weights, hot) -> torch.Tensor | None:
        """The hot (resident) experts' share of the routed output, on the accelerator."""
        if not hot.any():
            return None
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in ids[hot].unique().tolist():
            tok, k = torch.where((ids == e) & hot)
            add_int4_expert(out, x, tok, k, weights, self.weights[e])
        return out

    def submit(self, x, topk_ids, topk_weights):
        self._streamed = self.policy is not None and self.policy.decide(self.layer, x.shape[0]).stream
        if self._streamed:                                   # every assignment on the accelerator
            self._hot_out, _ = expert_streamer.stream_layer(x, topk_ids, topk_weights,
                                                            lambda e: self.weights.get(e) or self.fetch(e))
            return
        cpu_ids, cpu_w, hot = self.split(topk_ids, topk_weights)
        self.cpu.submit(x, cpu_ids, cpu_w)                             # the CPU starts on the cold experts
        self._hot_out = self._hot_forward(x, topk_ids, topk_weights, hot)   # the accelerator meanwhile

    def wait(self) -> torch.Tensor:
        if self._streamed:
            out, self._hot_out = self._hot_out, None
            return out
        y = self.cpu.wait()
        hot, self._hot_out = self._hot_out, None
        return y if hot is None else y.to(hot.device) + hot

    def forward(self, x, topk_ids, topk_weights):
        self.submit(x, topk_ids, topk_weights)
        return self.wait()


class AlwaysStream:
    """A policy that streams every layer (expert_streaming="always")."""

    def decide(self, layer, n_tokens, experts_hit=None):
        from .expert_streaming import Decision
        return Decision(layer, n_tokens, True, float("nan"), float("nan"))


def attach_accelerator_experts(llm, gpu_experts: int = 0, streaming: str = "off", rates=None,
                               profile_path: str | Path | None = None) -> dict[int, list[int]]:
    """Wrap every MoE layer's experts: the `gpu_experts` most used of the routing profile resident on
    the accelerator, and streaming per the cost model ("auto": with `rates`, never without a GPU)."""
    if streaming not in ("off", "auto", "always"):
        raise ValueError(f"expert_streaming {streaming!r} unknown; choose off, auto, always")
    c = llm.config
    hot: dict[int, list[int]] = {}
    if gpu_experts:
        path = Path(profile_path) if profile_path else llm.model_dir / PROFILE_FILE
        if not path.is_file():
            raise ValueError(f"--gpu-experts needs a routing profile: {path} not found "
                             f"(run `hybrid profile {llm.model_dir} --prompts FILE` first)")
        hot = choose_hot(load_profile(path), gpu_experts)
    policy = None
    if streaming == "always":
        policy = AlwaysStream()
    elif streaming == "auto":
        from .expert_streaming import LayerShape, Rates, StreamingPolicy
        rates = Rates(**rates) if isinstance(rates, dict) else rates
        policy = StreamingPolicy(rates if llm.device.type == "cuda" else None, LayerShape.from_config(c))
    def fetcher(layer):
        def fetch(e):
            stored = expert_int4(llm.checkpoint, layer, e)
            if stored is None:
                raise ValueError(f"experts on the accelerator need INT4 checkpoints; "
                                 f"model.layers.{layer}.mlp.experts.{e} is not INT4")
            return stored
        return fetch

    for layer in range(c.num_hidden_layers):
        if not c.is_moe_layer(layer) or (layer not in hot and policy is None):
            continue
        moe = llm.model.model.layers[layer].mlp
        fetch = fetcher(layer)
        resident = {e: fetch(e) for e in hot.get(layer, [])}
        moe.experts = HotExperts(moe.experts, resident, llm.device, c.n_routed_experts, layer, policy, fetch)
    return hot


def read_prompts(path: str | Path) -> list:
    """One prompt per line: plain text, or JSON objects with "prompt" (text or ids) or "messages"."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
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
    """Route the prompts (and max_tokens generated tokens each) and count the experts chosen."""
    from .sampling import SamplingParams
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

    from .llm import LLM
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
