"""Routing profile and the accelerator-side experts: which experts the router picks on real prompts,
and the N most used kept on the accelerator, plus the long-prefill streaming policy.

  hybrid profile MODEL_DIR --prompts FILE     -> MODEL_DIR/routing_profile.json (or --output)
  hybrid chat|serve|batch MODEL_DIR --gpu-experts N     (LLM(..., gpu_experts=N))
  LLM(..., expert_streaming="auto"|"always")

`attach_accelerator_experts` sets the `hot` and `policy` / `fetch` fields of every MoE layer's
ExpertOffload (hybrid/experts/offload.py); the hand-off itself does not change.
Checked by tests/test_hot_experts.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hybrid.experts.backends import expert_int4
from hybrid.experts.streaming import Decision, LayerShape, Rates, StreamingPolicy

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


class AlwaysStream:
    """A policy that streams every layer (expert_streaming="always")."""

    def decide(self, layer, n_tokens, experts_hit=None):
        return Decision(layer, n_tokens, True, float("nan"), float("nan"))


def attach_accelerator_experts(model, checkpoint, device: torch.device, model_dir: Path, gpu_experts: int = 0,
                               streaming: str = "off", rates=None, profile_path: str | Path | None = None
                               ) -> dict[int, list[int]]:
    """Set every MoE layer's accelerator-side experts: the `gpu_experts` most used of the routing
    profile resident on the accelerator, and streaming per the cost model ("auto": with `rates`, never
    without a GPU; "always": every step). Returns {layer: [hot experts]}."""
    if streaming not in ("off", "auto", "always"):
        raise ValueError(f"expert_streaming {streaming!r} unknown; choose off, auto, always")
    c = checkpoint.config
    hot: dict[int, list[int]] = {}
    if gpu_experts:
        path = Path(profile_path) if profile_path else Path(model_dir) / PROFILE_FILE
        if not path.is_file():
            raise ValueError(f"--gpu-experts needs a routing profile: {path} not found "
                             f"(run `hybrid profile {model_dir} --prompts FILE` first)")
        hot = choose_hot(load_profile(path), gpu_experts)
    policy = None
    if streaming == "always":
        policy = AlwaysStream()
    elif streaming == "auto":
        rates = Rates(**rates) if isinstance(rates, dict) else rates
        policy = StreamingPolicy(rates if device.type == "cuda" else None, LayerShape.from_config(c))

    def fetcher(layer):
        def fetch(e):
            stored = expert_int4(checkpoint, layer, e)
            if stored is None:
                raise ValueError(f"experts on the accelerator need INT4 checkpoints; "
                                 f"model.layers.{layer}.mlp.experts.{e} is not INT4")
            return stored
        return fetch

    for layer in range(c.num_hidden_layers):
        if not c.is_moe_layer(layer) or (layer not in hot and policy is None):
            continue
        offload = model.model.layers[layer].mlp.experts
        offload.fetch, offload.policy = fetcher(layer), policy
        if hot.get(layer):
            offload.set_hot({e: offload.fetch(e) for e in hot[layer]}, c.n_routed_experts)
    return hot
