"""The memory plan and tok/s prediction (hybrid/plan/) on the published K2.6 config (a directory
holding only config.json) and the `hybrid plan` command line: sizes, the 8-bit KV cache, the cache room,
the default context, the advice (every suggestion `hybrid plan` prints for three workstations is applied
and planned again: it must fit), one-line errors. Run: pytest tests/test_plan.py (a few seconds).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hybrid.config import load_config
from hybrid.apps.cli import cli_plan
from hybrid.apps.cli import main
from hybrid.plan import (GIB, accelerator_parts, Hardware, PlanError, default_max_context, expert_bytes, format_plan, kv_cache_bytes,
                         machine_memory, make_plan, parse_size, plan_to_json)

FIXTURES = Path(__file__).parent / "fixtures"
K26 = FIXTURES / "kimi-k2.6"
HW = {"ram_bandwidth_gbs": 300.0, "pcie_gbs": 25.0, "gpu_bandwidth_gbs": 1000.0, "cpu_kernel_efficiency": 0.6,
      "cpu_gflops": 2000.0, "gpu_tflops": 160.0}


@pytest.fixture(scope="module")
def k26():
    return load_config(K26)


def plan(config, gpu="24GB", ram="1TB", **kw):
    kw.setdefault("context", 65536)
    return make_plan(config, gpu_mem_bytes=parse_size(gpu), ram_bytes=parse_size(ram), **kw)


def test_k26_bytes(k26):
    p = plan(k26)
    per_expert = 3 * 2048 * 7168 * (0.5 + 2 / 32)                   # INT4 nibbles + a bf16 scale per 32
    assert expert_bytes(k26) == per_expert
    assert p.cpu_expert_bytes == 60 * 384 * per_expert == 570_760_888_320   # 531.6 GiB
    assert p.kv_cache_bytes == 61 * 65536 * (512 + 64) * 2 == kv_cache_bytes(k26, 65536, 1)
    attn = 7168 * 1536 + 1536 * 64 * 192 + 7168 * 576 + 64 * 128 * 7168    # q_a, q_b, kv_a_with_mqa, o
    assert p.parts["attention"] == 61 * attn * 2
    assert p.parts["kv_b_proj"] == 61 * 64 * (128 + 128) * 512 * 2      # heads x (nope + v) x kv_lora_rank
    assert p.parts["dense_mlp"] == 3 * 18432 * 7168 * 2
    assert p.parts["shared_experts"] == 60 * 3 * 2048 * 7168 * 2
    assert p.parts["lm_head"] == p.parts["embed_tokens"] == 163840 * 7168 * 2
    vision = p.parts["vision_tower"] + p.parts["vision_activations"]
    params = (p.gpu_weights_bytes - p.parts["router"] - vision) / 2
    assert 11.5e9 < params < 11.8e9                                   # the ~11.6B GPU-resident part
    assert 0.4e9 < p.parts["vision_tower"] / 2 < 0.5e9                # MoonViT + projector, ~0.47B in bf16
    assert p.pinned_bytes > 0 and p.stream_buffer_bytes == 2 * 32 * per_expert


def test_int8_keeps_kv_b_proj_in_the_model_dtype(k26):
    """--gpu-weights int8 quantizes every accelerator-side Linear (1 byte + an fp32 scale per row) but
    kv_b_proj, which the absorbed decode reads in place in the model dtype."""
    q = plan(k26, gpu_weights="int8")
    rows_cols = [(1536, 7168), (64 * 192, 1536), (576, 7168), (7168, 64 * 128)]   # q_a, q_b, kv_a, o
    assert q.parts["attention"] == 61 * sum(n * k + 4 * n for n, k in rows_cols)
    assert q.parts["kv_b_proj"] == 61 * 64 * 256 * 512 * 2
    assert q.parts["shared_experts"] == 60 * (2 * (2048 * 7168 + 4 * 2048) + 7168 * 2048 + 4 * 7168)
    cpu_only = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("1TB"), context=65536, gpu_weights="int8")
    assert cpu_only.parts["kv_b_proj"] == 61 * 64 * 256 * 512 * 4     # fp32 on a CPU-only machine


def test_torch_backend_holds_the_experts_dequantized(k26):
    """expert_backend torch / ref: the routed experts in RAM as fp32 (3 * D * I * 4 bytes each), not INT4;
    hot experts on the GPU stay INT4."""
    fp32_expert = 3 * 7168 * 2048 * 4
    for backend in ("torch", "ref"):
        p = plan(k26, gpu_weights="int8", expert_backend=backend)
        assert p.cpu_expert_bytes == 60 * 384 * fp32_expert == 4_058_744_094_720       # 3780 GiB
        assert not p.fits_ram and "dequantized (%s)" % backend in format_plan(p)
    numba = plan(k26, gpu_weights="int8")
    assert numba.cpu_expert_bytes == 60 * 384 * 3 * 2048 * 7168 * (0.5 + 2 / 32)
    assert plan(k26, gpu_weights="int8", expert_backend="auto").cpu_expert_bytes == numba.cpu_expert_bytes
    hot = plan(k26, gpu_weights="int8", expert_backend="torch", gpu_experts=10)
    assert hot.cpu_expert_bytes == (60 * 384 - 10) * fp32_expert
    assert hot.gpu_expert_bytes == 10 * 3 * 2048 * 7168 * (0.5 + 2 / 32)
    with pytest.raises(ValueError, match="expert_backend"):
        plan(k26, expert_backend="cuda")


def test_24gb_bf16_does_not_fit_and_advice_says_int8(k26):
    p = plan(k26, gpu_weights="bf16")
    assert not p.fits_gpu and not p.fits
    assert any("--gpu-weights int8" in a and "fits" in a for a in p.advice), p.advice
    q = plan(k26, gpu_weights="int8")
    assert q.fits_gpu and q.fits and not q.advice
    vision = p.parts["vision_tower"] + p.parts["vision_activations"]     # the tower stays bf16
    assert q.parts["vision_tower"] == p.parts["vision_tower"]
    assert q.gpu_weights_bytes - vision < 0.6 * (p.gpu_weights_bytes - vision)
    assert plan(k26, gpu_weights="fp8").gpu_weights_bytes == q.gpu_weights_bytes


def test_shorter_context_advice_fits(k26):
    p = plan(k26, gpu_weights="int8", context=262144)
    assert not p.fits_gpu
    (ctx,) = [sg["changes"]["context"] for sg in p.suggestions if list(sg["changes"]) == ["context"]]
    assert 65536 < ctx < 262144
    assert plan(k26, gpu_weights="int8", context=ctx).fits_gpu
    assert not plan(k26, gpu_weights="int8", context=ctx + 1024).fits_gpu


def test_512gb_ram_cannot_hold_the_experts_1tb_can(k26):
    p = plan(k26, ram="512GB", gpu_weights="int8")
    assert p.fits_gpu and not p.fits_ram and not p.fits
    assert any("RAM" in a and "531.6 GiB" in a for a in p.advice), p.advice
    assert not p.suggestions and any("no change of these options makes it fit" in a for a in p.advice), p.advice
    assert plan(k26, ram="1TB", gpu_weights="int8").fits_ram


def test_gpu_experts_move_bytes(k26):
    base, hot = plan(k26, gpu_weights="int8"), plan(k26, gpu_weights="int8", gpu_experts=100)
    eb = expert_bytes(k26)
    assert base.cpu_expert_bytes - hot.cpu_expert_bytes == 100 * eb
    assert hot.gpu_weights_bytes - base.gpu_weights_bytes == hot.gpu_expert_bytes == 100 * eb
    too_many = plan(k26, gpu_weights="int8", gpu_experts=400)
    assert not too_many.fits_gpu
    (n,) = [sg["changes"]["gpu_experts"] for sg in too_many.suggestions if list(sg["changes"]) == ["gpu_experts"]]
    assert 0 < n < 400 and plan(k26, gpu_weights="int8", gpu_experts=n).fits_gpu


def test_predictions(k26):
    p = plan(k26, gpu_weights="int8", hw=HW)
    step = p.prediction["decode_step_ms"]
    # decode: 8 experts x 60 layers of INT4 bytes per token over RAM bw x efficiency
    assert p.prediction["decode_expert_bytes_per_token"] == pytest.approx(60 * 8 * expert_bytes(k26))
    assert step["cpu_experts"] == pytest.approx(60 * 8 * expert_bytes(k26) / (300e9 * 0.6) * 1e3)
    assert p.predicted_decode_tok_s == pytest.approx(1e3 / sum(step.values()))
    assert 5 < p.predicted_decode_tok_s < 20
    assert p.prediction["prefill_experts_streamed"] and p.prediction["stream_threshold_tokens"] > 100
    cpu_only = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("1TB"), context=65536, hw=HW)
    assert not cpu_only.on_gpu and cpu_only.gpu_total_bytes == 0
    assert not cpu_only.prediction["prefill_experts_streamed"]
    assert cpu_only.predicted_prefill_tok_s < p.predicted_prefill_tok_s
    assert cpu_only.predicted_decode_tok_s < p.predicted_decode_tok_s
    assert "predicted: prefill" in format_plan(p)


def test_hardware_from_bench_experts_json():
    bench = {"read_bandwidth_gbs": 20.0, "decode_ratio": 0.7, "prefill_512_gflops": 150.0, "threads": 2}
    hw = Hardware.from_dict(bench)
    assert (hw.ram_bandwidth_gbs, hw.cpu_kernel_efficiency, hw.cpu_gflops, hw.has_gpu) == (20.0, 0.7, 150.0, False)
    with pytest.raises(ValueError, match="ram_bandwidth_gbs"):
        Hardware.from_dict({"pcie_gbs": 25})


def test_other_configs_plan():
    for name, layers, experts in [("kimi-k2-thinking", 60, 384), ("deepseek-v3", 58, 256)]:
        c = load_config(FIXTURES / name)
        p = make_plan(c, gpu_mem_bytes=parse_size("48GB"), ram_bytes=parse_size("1TB"), context=32768,
                      gpu_weights="int8")
        assert p.cpu_expert_bytes == layers * experts * expert_bytes(c)     # fp8 experts: INT4 at load
        assert p.fits, format_plan(p)


def test_parse_size_and_machine_memory():
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24g") == 24 * GIB
    assert parse_size("1TB") == 1024 * GIB and parse_size("1.5T") == 1536 * GIB
    assert parse_size("512MB") == 512 << 20 and parse_size("1000B") == 1000 and parse_size(7) == 7
    assert parse_size("0") == 0
    for bad in ("", "24 XB", "GB", "-1GB", "24", "1000"):          # a bare number is refused: 24 -> 24GB?
        with pytest.raises(ValueError):
            parse_size(bad)
    mem = machine_memory()
    assert mem["ram_bytes"] > 0 and mem["gpu_mem_bytes"] >= 0


def test_bad_arguments(k26):
    with pytest.raises(ValueError, match="bf16, int8, fp8"):
        plan(k26, gpu_weights="int4")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan(k26, context=10**7)


def test_cli_plan_refuses_cpu_weights_with_a_gpu(capsys):
    """An explicit --cpu-weights format with a GPU is one line on stderr, exit 2, as LLM refuses it."""
    assert main(["plan", str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--cpu-weights", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpu_weights" in err
    assert cli_plan([str(K26), "--gpu-mem", "0", "--ram", "1TB", "--context", "4096", "--cpu-weights", "int8",
                     "--json"]) in (0, 1)


def test_cli_plan_json(capsys):
    rc = cli_plan([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--context", "65536", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["fits"] is False
    for key in ("gpu_weights_bytes", "kv_cache_bytes", "cpu_expert_bytes", "pinned_bytes", "advice"):
        assert key in out
    assert [sg["flags"] for sg in out["suggestions"]] == ["--gpu-weights int8"]    # the one change that fits
    assert out["predicted_decode_tok_s"] > 0 and out["hw_source"] == "default rates"   # no --hw: marked estimate


def test_cli_plan_hw_and_table(tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps(HW))
    rc = cli_plan([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--gpu-weights", "int8", "--hw", str(hw), "--json",
                   "--max-context", "65536"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["fits"] is True and not out["advice"]
    assert out["predicted_prefill_tok_s"] > 0 and out["predicted_decode_tok_s"] > 0
    assert out == plan_to_json(plan(load_config(K26), gpu_weights="int8", hw=HW, hw_source=f"--hw {hw}"))
    rc = cli_plan([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--batch", "2"])
    text = capsys.readouterr().out
    assert rc == 1 and "memory plan" in text and "NO" in text and "--gpu-weights int8" in text


def test_tiny_synthetic_plan(tiny_dir):
    c = load_config(tiny_dir)
    p = make_plan(c, gpu_mem_bytes=0, ram_bytes=parse_size("16GB"), context=4096, hw=HW)
    assert p.fits and p.cpu_expert_bytes == c.num_moe_layers * c.n_routed_experts * expert_bytes(c)


# ---- 8-bit KV cache, cache room, default context ----------------------------------------------
KV_WIDTH = 512 + 64          # K2.6 kv_lora_rank + qk_rope_head_dim


def test_kv_cache_dtypes(k26):
    """bf16: 2 bytes per latent value; 8-bit: 1 byte + two fp32 scales per token per layer; auto on a
    CPU-only machine: fp32 (the model dtype there)."""
    assert plan(k26, kv_cache_dtype="bf16").kv_cache_bytes == 61 * 65536 * KV_WIDTH * 2
    for kind in ("fp8", "int8"):
        assert plan(k26, kv_cache_dtype=kind).kv_cache_bytes == 61 * 65536 * (KV_WIDTH + 8)
    cpu = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("1TB"), context=4096)
    assert cpu.kv_cache_bytes == 61 * 4096 * KV_WIDTH * 4
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        plan(k26, kv_cache_dtype="int4")


def test_cache_room_in_tokens(k26):
    p = plan(k26, gpu="48GB", gpu_weights="int8", context=8192)
    rest = p.gpu_total_bytes - p.kv_cache_bytes                          # everything but the cache
    assert p.cache_room["bf16"] == (48 * GIB - rest) // (61 * KV_WIDTH * 2)
    assert p.cache_room["8-bit"] == (48 * GIB - rest) // (61 * (KV_WIDTH + 8))
    text = format_plan(p)
    assert f"bf16: {p.cache_room['bf16']} tokens" in text and f"{p.cache_room['bf16'] // 8192} of 8K" in text


def test_default_max_context(k26):
    """The longest context that fits (a multiple of 256), the model's maximum when that fits; PlanError
    when not even the shortest fits."""
    gpu, ram = parse_size("24GB"), parse_size("1TB")
    ctx = default_max_context(k26, gpu, ram, gpu_weights="int8")
    assert ctx % 256 == 0 and 1024 <= ctx < k26.max_position_embeddings
    assert make_plan(k26, gpu_mem_bytes=gpu, ram_bytes=ram, context=ctx, gpu_weights="int8").fits
    assert not make_plan(k26, gpu_mem_bytes=gpu, ram_bytes=ram, context=ctx + 256, gpu_weights="int8").fits
    assert default_max_context(k26, gpu, ram, gpu_weights="int8", batch=4) < ctx
    assert default_max_context(k26, parse_size("80GB"), ram) == k26.max_position_embeddings
    with pytest.raises(PlanError):
        default_max_context(k26, gpu, parse_size("512GB"))


# ---- `hybrid plan` on three workstations: every printed suggestion, applied, fits --------------
WORKSTATIONS = [("24GB", "512GB"), ("48GB", "1TB"), ("0", "768GB")]
SETTINGS = [[], ["--max-context", "262144"], ["--max-context", "262144", "--max-batch", "4"],
            ["--max-context", "131072", "--max-batch", "8", "--gpu-experts", "2000"],
            ["--max-context", "65536", "--max-batch", "16", "--expert-backend", "torch"]]
SUGGESTION = re.compile(r"^  - ((?:--[a-z-]+ \S+ ?)+) fits \(", re.M)


@pytest.mark.parametrize("gpu,ram", WORKSTATIONS)
def test_every_suggestion_fits_when_applied(gpu, ram, capsys):
    printed = 0
    for settings in SETTINGS:
        argv = [str(K26), "--gpu-mem", gpu, "--ram", ram, *settings]
        rc = cli_plan(argv)
        text = capsys.readouterr().out
        assert ("fits" in text) and rc == (0 if "does not fit" not in text else 1), text
        if rc == 0:
            continue
        assert re.search(r"does not fit: (GPU|RAM): needs [\d.]+ GiB, has [\d.]+ GiB", text), text
        flags = SUGGESTION.findall(text)
        assert flags or "no change of these options makes it fit" in text, text
        for f in flags:
            printed += 1
            assert cli_plan(argv + f.split()) == 0, (argv, f, capsys.readouterr().out)
            capsys.readouterr()
    assert printed > 0 or gpu == "24GB"          # 512 GB cannot hold K2.6's 531.6 GiB of experts at all


def test_no_gpu_names_the_kv_cache_when_it_is_the_cause(k26):
    """CPU-only, 768 GB: 8 sequences of 262144 tokens overflow RAM because of the KV cache; the advice
    shortens the context / batch or quantizes the cache, and does not blame the experts."""
    p = make_plan(k26, gpu_mem_bytes=0, ram_bytes=parse_size("768GB"), context=262144, batch=8)
    assert not p.fits and "KV cache (262144 tokens x 8)" in p.problem
    kinds = {k for sg in p.suggestions for k in sg["changes"]}
    assert {"context", "batch", "kv_cache_dtype"} <= kinds and "expert_backend" not in kinds
    assert all(make_plan(k26, **{**dict(gpu_mem_bytes=0, ram_bytes=parse_size("768GB"), context=262144, batch=8),
                                 **sg["changes"]}).fits for sg in p.suggestions)


def test_plan_cli_errors_are_one_line(capsys, tmp_path):
    cases = [([str(K26), "--gpu-mem", "24", "--ram", "1TB"], "24GB"),
             ([str(tmp_path / "nope"), "--gpu-mem", "24GB"], "no such directory"),
             ([str(tmp_path), "--gpu-mem", "24GB"], "config.json"),
             ([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--max-context", "300000"], "maximum"),
             ([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--hw", str(tmp_path / "hw.json")], "hw.json")]
    for argv, needle in cases:
        assert main(["plan", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("hybrid plan: error:") and needle in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError):
        main(["plan", str(tmp_path / "nope"), "--debug"])           # --debug: the exception itself


def test_old_option_names_still_read_the_same(k26, capsys):
    new = cli_plan([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--max-context", "8192", "--max-batch", "2",
                    "--json"])
    a = json.loads(capsys.readouterr().out)
    old = cli_plan([str(K26), "--gpu-mem", "24GB", "--ram", "1TB", "--context", "8192", "--batch", "2", "--json"])
    assert new == old and a == json.loads(capsys.readouterr().out) and (a["context"], a["batch"]) == (8192, 2)


def test_vision_weights_counted_as_the_checkpoint_holds_them(tiny_dir):
    """The plan's vision part equals the parameters of the vision_tower.* / mm_projector.* tensors that the
    synthetic K2.6 checkpoint holds (read from the safetensors headers, not from our formula)."""
    from safetensors import safe_open
    config = load_config(tiny_dir)
    n = 0
    for shard in sorted(Path(tiny_dir).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                if name.startswith(("vision_tower.", "mm_projector.")):
                    n += f.get_slice(name).get_shape().numel() if hasattr(f.get_slice(name).get_shape(), "numel") \
                        else int(__import__("math").prod(f.get_slice(name).get_shape()))
    assert n > 0
    assert accelerator_parts(config, "bf16")["vision_tower"] == 2 * n
