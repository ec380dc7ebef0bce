"""Logit match against transformers' DeepseekV3ForCausalLM on fresh synthetic checkpoints (the figures
of tests/test_model.py, printed): for each variant and prompts of 1, 23, 64 and 300 tokens, the
per-position error |ours - HF| / max |logit| (worst and median position) and argmax agreement, with
routing free and with routing frozen (our routers replay transformers' expert choices). The routed
experts of bf16 / FP8 checkpoints are INT4 round trips on both sides (the runtime quantizes them at
load). With int8 activations (numba) the worst free positions are those where a router near-tie flips.

    python tools/logit_match.py [--expert-backend torch|ref|numba|kt|auto]
    python tools/logit_match.py --gpu-weights int8|fp8 [--model-dir DIR]

--gpu-weights: the logit error of 8-bit accelerator-side weights (hybrid/model/int8_linear.py; kv_b_proj
is not quantized) against the same model unquantized, with routing free and frozen
(`measure_8bit_logit_error`, also used by tests/test_gpu_weights.py). Importing this module does no work.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logit_error(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Figures comparing two logit tensors [T, V]."""
    ref, got = ref.float(), got.float()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30))
    lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1)
    return {
        "positions": ref.shape[0],
        "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "rel_l2_max": float(rel.max()),
        "rel_l2_mean": float(rel.mean()),
        "max_abs": float((got - ref).abs().max()),
        "kl_mean": float(kl.mean()),
    }


def measure_8bit_logit_error(model_dir: str | Path, fmt: str = "int8", n_tokens: int = 64, seed: int = 0,
                             lm_head: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """Logits of the checkpoint with 8-bit accelerator-side weights vs the same model unquantized.

    Loads MODEL_DIR (torch expert backend: the routed experts are the same on both sides), scores
    `n_tokens` random ids, quantizes in place (quantize_model_linears: attention but kv_b_proj, dense
    MLP, shared experts, lm_head when `lm_head`), scores again. The reference is the model in `dtype`
    (fp32 on the CPU: the checkpoint's bf16 weights widened exactly). Returned figures:
      free:   the quantized model run as is (a router near a tie may pick other experts);
      frozen: the routers replay the reference's expert choices and weights, which isolates the
              error of the quantized Linears from routing flips;
      bf16_baseline: the unquantized model computed in bf16 against the fp32 reference, the noise
              floor a bf16 GPU run already has on the same checkpoint;
    plus "format", "lm_head_quantized" and quantize_model_linears' "swapped", "bytes_before", "bytes_after".
    """
    from hybrid.llm import LLM
    from hybrid.model.int8_linear import quantize_model_linears
    from hybrid.model.model import Router
    llm = LLM(model_dir, device="cpu", dtype=dtype, expert_backend="torch", progress=False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, llm.config.vocab_size, (n_tokens,), generator=g).tolist()
    routes: dict[str, list] = {}
    replay = {"on": False}

    def hook(name):
        def f(module, args, out):
            if replay["on"]:
                return routes[name].pop(0)
            routes.setdefault(name, []).append(out)
        return f
    handles = [m.register_forward_hook(hook(n)) for n, m in llm.model.named_modules() if isinstance(m, Router)]
    ref = llm.score(ids)
    info = quantize_model_linears(llm.model, fmt, lm_head=lm_head)
    replay["on"] = True
    frozen = llm.score(ids)
    for h in handles:
        h.remove()
    free = llm.score(ids)
    bf16 = LLM(model_dir, device="cpu", dtype=torch.bfloat16, expert_backend="torch", progress=False).score(ids)
    return {"format": fmt, "lm_head_quantized": lm_head, "free": logit_error(ref, free),
            "frozen": logit_error(ref, frozen), "bf16_baseline": logit_error(ref, bf16), **info}


def _fmt_err(e: dict) -> str:
    return (f"rel L2 max {e['rel_l2_max']:.2e} mean {e['rel_l2_mean']:.2e}, max abs {e['max_abs']:.2e}, "
            f"KL {e['kl_mean']:.2e}, argmax {e['argmax_agreement']:.1%} of {e['positions']}")


def gpu_weights_report(fmt: str, model_dir: str | None) -> None:
    from hybrid.synthetic import write_checkpoint
    with tempfile.TemporaryDirectory() as d:
        if model_dir is None:
            model_dir = write_checkpoint(d, "tiny", tokenizer=False)
        for lm_head in (True, False):
            r = measure_8bit_logit_error(model_dir, fmt, lm_head=lm_head)
            print(f"--gpu-weights {fmt} (lm_head {'quantized' if lm_head else 'kept'}): {r['swapped']} Linears, "
                  f"{r['bytes_before']} -> {r['bytes_after']} bytes")
            for k in ("free", "frozen", "bf16_baseline"):
                print(f"  {k:14s} {_fmt_err(r[k])}")


def backend_report(backend: str) -> None:
    sys.path[:0] = [p for p in (ROOT, os.path.join(ROOT, "tests")) if p not in sys.path]
    from conftest import VARIANTS
    from hf_reference import build_hf_model, freeze_routing, hf_routes
    from hybrid import LLM
    from hybrid.formats import dequantize_int4, quantize_int4
    from hybrid.synthetic import write_checkpoint

    def int4_round_trip(w):
        return dequantize_int4(*quantize_int4(w), in_features=w.shape[1], dtype=torch.float32)
    for name, kw in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(d, "tiny", tokenizer=False, **kw)
            llm = LLM(d, device="cpu", expert_backend=backend, progress=False)
            ref = build_hf_model(d, experts_int4=int4_round_trip)
            errs, agree, frozen = [], [], []
            for n in (1, 23, 64, 300):
                ids = torch.randint(0, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                theirs, routes = hf_routes(ref, ids)
                ours = llm.score(ids)
                with freeze_routing(llm.model, routes):
                    ours_frozen = llm.score(ids)
                scale = theirs.abs().amax(-1)
                errs.append((ours - theirs).abs().amax(-1) / scale)
                frozen.append((ours_frozen - theirs).abs().amax(-1) / scale)
                agree.append(ours.argmax(-1) == theirs.argmax(-1))
        err, fz, agree = torch.cat(errs), torch.cat(frozen), torch.cat(agree).float()
        print(f"{name:16s} {llm.expert_backend}: |ours-hf|/max|logit| worst {err.max():.2e}, median "
              f"{err.median():.2e}; routing frozen: worst {fz.max():.2e}, median {fz.median():.2e}; "
              f"same argmax at {agree.mean():.1%} of {len(agree)} positions")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expert-backend", default="torch", help="auto, torch, ref, numba or kt (default torch)")
    ap.add_argument("--gpu-weights", choices=("int8", "fp8"),
                    help="instead: the logit error of 8-bit accelerator-side weights vs the unquantized model")
    ap.add_argument("--model-dir", help="with --gpu-weights: a checkpoint (default: a fresh tiny synthetic one)")
    args = ap.parse_args(argv)
    if args.gpu_weights:
        gpu_weights_report(args.gpu_weights, args.model_dir)
    else:
        backend_report(args.expert_backend)


if __name__ == "__main__":
    main()
