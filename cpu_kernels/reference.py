"""Plain numpy references for the routed-expert kernels (the correctness yardstick).

``moe_int4_ref`` runs the routed experts on dense (dequantized) weights; ``dequantize_ref``
decodes compressed-tensors INT4 straight from the on-disk format. Compare a fast kernel with
``moe_int4_ref`` run on the *same* dequantized weights (``CPUExperts.dequantized``).
Checked by tests/test_cpu_kernels.py.
"""
import numpy as np
import torch

# T tokens, K top-k, E experts, D hidden, I intermediate


def _np32(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float32)


def dequantize_ref(packed, scale, round_bf16: bool = False) -> np.ndarray:
    """compressed-tensors packed int32 [N, K/8] + scale [N, K/32] -> float32 [N, K] = (u-8)*scale.

    round_bf16=True rounds each weight to bf16 as compressed-tensors' own dequantization does
    (KIMI_K2_SPEC.md §2.3); False keeps the exact fp32 product, which the INT4 kernels use."""
    p = (packed.numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)).view(np.uint32)
    u = np.stack([(p >> (4 * i)) & 0xF for i in range(8)], axis=2).reshape(p.shape[0], -1)
    q = u.astype(np.float32) - 8.0
    s = _np32(scale)
    w = q * np.repeat(s, 32, axis=1)
    if round_bf16:
        w = torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    return w


def silu(z):
    return z / (1.0 + np.exp(-z))


def moe_int4_ref(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> np.ndarray:
    """y[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t,k].

    x [T, D]; topk_ids/topk_weights [T, K]; w_gate/w_up [E, I, D]; w_down [E, D, I] (sequences of
    per-expert [N, K] arrays work too). fp32 in, fp32 out, tokens grouped by expert."""
    x = _np32(x)
    ids = np.asarray(topk_ids.cpu() if isinstance(topk_ids, torch.Tensor) else topk_ids).astype(np.int64)
    wts = _np32(topk_weights)
    y = np.zeros(x.shape, np.float32)
    for e in np.unique(ids):
        t, k = np.nonzero(ids == e)  # [n]
        xe = x[t]  # [n, D]
        h = silu(xe @ _np32(w_gate[e]).T) * (xe @ _np32(w_up[e]).T)  # [n, I]
        np.add.at(y, t, wts[t, k, None] * (h @ _np32(w_down[e]).T))
    return y
