"""Plain numpy reference for the routed-expert kernels (the correctness yardstick).

``moe_int4_ref`` runs the routed experts on dense (dequantized) weights. Compare a fast kernel with
``moe_int4_ref`` run on the *same* dequantized weights (``CPUExperts.dequantized``); the runtime's
"ref" backend (hybrid/experts/backends.py) runs it on weights dequantized as compressed-tensors does.
Checked by tests/test_cpu_kernels.py.
"""
import numpy as np
import torch

# T tokens, K top-k, E experts, D hidden, I intermediate


def _np32(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().float().numpy()
    return np.asarray(a, dtype=np.float32)


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


def linear_ref(x, w, scale=None) -> np.ndarray:
    """Dense Linear y = x . W^T in float64, rounded to fp32: W given as bf16 bit patterns (uint16), as
    int8 with a per-row scale (W = w * scale[:, None]), or as floats. The yardstick for
    cpu_kernels/dense.py (tests/test_cpu_dense.py)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w)
    if w.dtype == np.uint16:
        wf = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        wf = w.astype(np.float64)
    if scale is not None:
        wf = wf * np.asarray(scale, dtype=np.float64)[:, None]
    return (x @ wf.T).astype(np.float32)
