"""hybrid/experts/backends.py: how the expert backend is chosen (auto, named, unknown, not installed,
unsupported activation format, the FALLBACK and its message), the per-expert RAM figures, and
load_layer_experts handing every backend the same INT4 for an FP8 checkpoint (the one quantizer).
The backends' arithmetic is checked in tests/test_cpu_kernels.py and against transformers in
tests/test_model.py."""
import numpy as np
import pytest
import torch

from cpu_kernels import kt_available, layout
from hybrid import LLM
from hybrid.checkpoint import Checkpoint
from hybrid.config import load_config
from hybrid.experts import backends
from hybrid.experts.backends import (BACKENDS, expert_nbytes, load_layer_experts, make_backend,
                                     resolve_backend)
from hybrid.formats import (dequantize_fp8_block, dequantize_int4, int4_expert_nbytes, quantize_int4, unpack_int4,
                            unpack_int4_u)


@pytest.fixture
def config(tiny_dir):
    return load_config(tiny_dir)


def _no_fast_backends(monkeypatch):
    """Every fast backend's factory fails to import, as on a machine without numba or kt-kernel."""
    def missing(name):
        def factory():
            raise ImportError(f"no module named {name!r} (test)")
        return factory
    for name in backends.AUTO_CANDIDATES:
        monkeypatch.setitem(BACKENDS, name, (missing(name), BACKENDS[name][1]))


# ---- choosing -------------------------------------------------------------------------------
def test_auto_is_numba_here_with_a_reason(config):
    name, why = resolve_backend("auto", config)
    assert name == "numba"
    assert isinstance(why, str) and why and not why.startswith("FALLBACK")


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "kt" or kt_available()])
def test_named_backend_is_taken_as_named(config, name):
    assert resolve_backend(name, config) == (name, "named by the user")


def test_unknown_backend_lists_the_choices(config):
    with pytest.raises(ValueError, match="unknown") as err:
        resolve_backend("cuda-magic", config)
    for choice in ("auto", *BACKENDS):
        assert choice in str(err.value)


def test_kt_without_kt_kernel_cannot_run(config):
    if kt_available():
        pytest.skip("kt-kernel is installed here")
    with pytest.raises(ValueError, match="'kt' cannot run here"):
        resolve_backend("kt", config)
    with pytest.raises(ValueError, match="cannot run here"):
        make_backend("kt", config)


@pytest.mark.parametrize("name", ["torch", "ref"])
def test_act_format_the_backend_cannot_honour(config, name):
    with pytest.raises(ValueError, match="expert_act_format 'int8x2' is not supported"):
        resolve_backend(name, config, act_format="int8x2")


def test_numba_takes_both_act_formats(config):
    for fmt in ("int8", "int8x2"):
        assert resolve_backend("numba", config, act_format=fmt)[0] == "numba"
        assert make_backend("numba", config, act_format=fmt).act_format == fmt
    with pytest.raises(ValueError, match="not supported"):
        resolve_backend("numba", config, act_format="fp32")


def test_auto_with_int8x2_is_numba(config):
    assert resolve_backend("auto", config, act_format="int8x2")[0] == "numba"


def test_auto_falls_back_to_torch_and_says_so(config, monkeypatch):
    _no_fast_backends(monkeypatch)
    name, why = resolve_backend("auto", config)
    assert name == "torch"
    assert why.startswith("FALLBACK")
    for cand in backends.AUTO_CANDIDATES:      # each fast backend's reason is in the message
        assert f"no module named {cand!r}" in why
    with pytest.raises(ValueError, match="no backend takes expert_act_format 'int8x2'"):
        resolve_backend("auto", config, act_format="int8x2")   # an option is never dropped silently


def test_llm_prints_the_fallback_even_when_quiet(tiny_dir, monkeypatch, capsys):
    _no_fast_backends(monkeypatch)
    llm = LLM(tiny_dir, progress=False, max_context=256, max_batch=1)
    assert llm.expert_backend == "torch"
    _, why = resolve_backend("auto", llm.config)
    err = capsys.readouterr().err
    assert "FALLBACK" in err and why in err
    assert llm.score([1, 2, 3]).shape == (3, llm.config.vocab_size)


def test_expert_cache_needs_numba(ckpt_copy):
    with pytest.raises(ValueError, match="expert_cache"):
        LLM(ckpt_copy, expert_backend="torch", expert_cache=True, progress=False)
    assert not (ckpt_copy / ".hybrid-cache").exists()


# ---- bytes ----------------------------------------------------------------------------------
def test_expert_nbytes(config):
    D, I = config.hidden_size, config.moe_intermediate_size
    assert expert_nbytes("numba", config) == int4_expert_nbytes(D, I)
    assert expert_nbytes("auto", config) == int4_expert_nbytes(D, I)
    assert expert_nbytes("kt", config) == int4_expert_nbytes(D, I)
    assert expert_nbytes("torch", config) == expert_nbytes("ref", config) == 3 * D * I * 4
    # by hand: gate and up [I, D], down [D, I]: D*I/2 bytes of nibbles + D*I/32 bf16 scales each
    assert int4_expert_nbytes(D, I) == 3 * (D * I // 2 + D * I // 32 * 2)


# ---- loading: an FP8 checkpoint gives every backend the same INT4 ------------------------------
def _expected_int4(ckpt, layer, e):
    """Each projection's INT4 by hand: the FP8 weight dequantized from the raw tensors, then quantize_int4."""
    cfg = ckpt.config
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    out = {}
    for proj, (n, k) in {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}.items():
        P = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
        w = ckpt.tensor(f"{P}.weight")
        assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (n, k)
        W = dequantize_fp8_block(w, ckpt.tensor(f"{P}.weight_scale_inv"), cfg.quantization.block_size)
        out[proj] = quantize_int4(W)
    return out


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "kt" or kt_available()])
def test_fp8_checkpoint_gives_every_backend_the_same_int4(checkpoint_dir, name):
    d = checkpoint_dir("deepseek-v3-fp8")
    cfg = load_config(d)
    assert cfg.quantization.method == "fp8"
    ckpt = Checkpoint(d, cfg)
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    ex = load_layer_experts(ckpt, layer, name)
    assert ex.nbytes == cfg.n_routed_experts * BACKENDS[name][1](D, I)
    for e in range(cfg.n_routed_experts):
        want = _expected_int4(ckpt, layer, e)
        if name in ("torch", "ref"):
            for got, proj, k in ((ex.w_gate[e], "gate_proj", D), (ex.w_up[e], "up_proj", D),
                                 (ex.w_down[e], "down_proj", I)):
                assert torch.equal(got, dequantize_int4(*want[proj], k, dtype=torch.float32)), (e, proj)
        elif name == "numba":
            for got, arr, proj, k in ((ex.dequantized(e)[0], ex.wg, "gate_proj", D),
                                      (ex.dequantized(e)[1], ex.wu, "up_proj", D),
                                      (ex.dequantized(e)[2], ex.wd, "down_proj", I)):
                packed, scale = want[proj]
                np.testing.assert_array_equal(arr[e], layout.repack(unpack_int4_u(packed, k).numpy(), scale))
                exact = unpack_int4(packed, k).float() * scale.float().repeat_interleave(32, dim=1)
                assert torch.equal(got, exact), (e, proj)
        elif name == "kt":   # kt keeps the int32 words as bytes and the bf16 scales
            for i, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
                packed, scale = want[proj]
                words, s = ex._tensors[e][2 * i], ex._tensors[e][2 * i + 1]
                assert torch.equal(words.view(torch.int32), packed) and torch.equal(s, scale)
        else:
            raise AssertionError(f"backend {name!r} has no check here: add one")


KT_PRINTS = ("Hello", "Goodbye", "NumaPool", "CPUInfer")   # what kt-kernel 0.7.2's C++ code prints


def test_kt_kernel_prints_stay_out_of_the_terminal(tiny_dir):
    """kt measured by "auto" (or chosen) must not print into the user's terminal, at load or at exit."""
    pytest.importorskip("kt_kernel")
    import os
    import subprocess
    import sys
    code = (f"from hybrid import LLM; llm = LLM({str(tiny_dir)!r}, expert_backend='kt', progress=False); "
            "llm.score([1, 2, 3]); print('scored')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scored", out.stdout
    assert not any(p in out.stderr for p in KT_PRINTS), out.stderr
