"""The checkpoint reader: lazy reads, and one clear error (file + tensor) for each kind of bad input."""
import json
import resource
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrid import LLM, CheckpointError, ConfigError, load_config
from hybrid.checkpoint import Checkpoint

EXPERT = "model.layers.1.mlp.experts.3.up_proj"
NORM = "model.layers.0.input_layernorm.weight"


def _shard_of(d, name):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / index["weight_map"]["language_model." + name]


def _rewrite(d, name, new=None, drop=False, path=None):
    """Replace, add or drop one tensor inside its shard, keeping the index as it is."""
    path = path or _shard_of(d, name)
    tensors = load_file(str(path))
    if drop:
        del tensors["language_model." + name]
    else:
        tensors["language_model." + name] = new
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _load(d):
    return LLM(d, expert_backend="torch", progress=False)


def test_reads_lazily_from_a_memory_map(tmp_path):
    """A shard with a 3 GB tensor (sparse file): opening it and reading a small tensor reads almost nothing."""
    d = tmp_path / "big"
    d.mkdir()
    small = torch.arange(16, dtype=torch.float32)
    header = {"small": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
              "huge": {"dtype": "BF16", "shape": [3 * 2**29], "data_offsets": [64, 64 + 3 * 2**30]}}
    raw = json.dumps(header).encode()
    path = d / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + small.numpy().tobytes())
        f.truncate(8 + len(raw) + 64 + 3 * 2**30)
    config = load_config(__import__("pathlib").Path(__file__).parent / "fixtures" / "kimi-k2-thinking")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ck = Checkpoint(d, config)
    assert torch.equal(ck.tensor("small", shape=(16,)), small)
    huge = ck.tensor("huge", finite=False)          # the NaN/Inf check would read it all
    assert huge.shape == (3 * 2**29,) and huge[-1].item() == 0.0     # touches one page
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"reading two tensors grew the process by {grown_mb:.0f} MB"


def test_missing_shard_names_index_and_shard(ckpt_copy):
    shard = _shard_of(ckpt_copy, EXPERT + ".weight_packed")
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        _load(ckpt_copy)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and shard.name in msg and "missing" in msg


def test_missing_tensor_is_named(ckpt_copy):
    _rewrite(ckpt_copy, EXPERT + ".weight_scale", drop=True)
    index = ckpt_copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["language_model." + EXPERT + ".weight_scale"]
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"'language_model.{EXPERT}.weight_scale' not found"):
        _load(ckpt_copy)


def test_index_lists_a_tensor_the_shard_lacks(ckpt_copy):
    path = _rewrite(ckpt_copy, NORM, drop=True)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt_copy)
    assert path.name in str(e.value) and NORM in str(e.value)


def test_wrong_shape_is_named(ckpt_copy):
    path = _rewrite(ckpt_copy, NORM, torch.ones(100, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError) as e:
        _load(ckpt_copy)
    assert path.name in str(e.value) and NORM in str(e.value) and "[100]" in str(e.value) and "[128]" in str(e.value)


def test_wrong_dtype_is_named(ckpt_copy):
    name = EXPERT + ".weight_packed"
    packed = load_file(str(_shard_of(ckpt_copy, name)))["language_model." + name]
    _rewrite(ckpt_copy, EXPERT + ".weight_packed", packed.to(torch.int64))
    with pytest.raises(CheckpointError, match=r"weight_packed' has dtype I64, expected I32"):
        _load(ckpt_copy)


def test_weight_shape_disagreeing_with_config(ckpt_copy):
    _rewrite(ckpt_copy, EXPERT + ".weight_shape", torch.tensor([64, 256], dtype=torch.int32))
    with pytest.raises(CheckpointError, match=r"weight_shape' is \[64, 256\], config.json implies \[64, 128\]"):
        _load(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    path = _shard_of(ckpt_copy, EXPERT + ".weight_packed")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError) as e:
        _load(ckpt_copy)
    assert path.name in str(e.value) and "truncated" in str(e.value)


def test_corrupt_header(ckpt_copy):
    path = _shard_of(ckpt_copy, EXPERT + ".weight_packed")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage!")
    with pytest.raises(CheckpointError, match="corrupt shard header") as e:
        _load(ckpt_copy)
    assert path.name in str(e.value)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    with pytest.raises(CheckpointError, match="header length"):
        _load(ckpt_copy)


def test_unknown_quantization_format_of_a_tensor(ckpt_copy):
    """An asymmetric-INT4 tensor (zero points) where our format has none: named, not misread."""
    index = ckpt_copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = _shard_of(ckpt_copy, EXPERT + ".weight_packed")
    _rewrite(ckpt_copy, EXPERT + ".weight_zero_point", torch.zeros(64, 4, dtype=torch.int32), path=shard)
    for suffix in (".weight_packed", ".weight_scale", ".weight_shape"):
        _rewrite(ckpt_copy, EXPERT + suffix, drop=True)
        del data["weight_map"]["language_model." + EXPERT + suffix]
    data["weight_map"]["language_model." + EXPERT + ".weight_zero_point"] = shard.name
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown quantization format") as e:
        _load(ckpt_copy)
    assert EXPERT in str(e.value)


def test_unknown_quantization_method_in_config(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["text_config"]["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_method.*awq"):
        _load(ckpt_copy)


def test_loading_leaves_no_shard_mapped(tiny_dir):
    """After each layer the loader drops the shard maps: copied-out pages stop counting in the process."""
    llm = _load(tiny_dir)
    assert all(shard._mmap is None for shard in llm.checkpoint.shards.values())
    assert llm.checkpoint.tensor("model.norm.weight").shape == (128,)      # and they reopen on demand


def test_bf16_layout_reads_as_unquantized(tmp_path):
    """write_checkpoint(layout="bf16"): DeepSeek-V3's config without quantization_config, every Linear
    (routed experts included) a plain bf16 .weight; the reader sees no quantization and no INT4 name."""
    from hybrid.synthetic import write_checkpoint
    d = write_checkpoint(tmp_path / "bf16", "tiny", layout="bf16", tokenizer=False, n_routed_experts=8, seed=7)
    raw = json.loads((d / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v3" and "quantization_config" not in raw
    config = load_config(d)
    assert config.quantization.method == "none" and config.weight_prefix == ""
    ck = Checkpoint(d, config)
    assert not [n for n in ck.names() if n.endswith(("weight_packed", "weight_scale", "weight_scale_inv"))]
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = f"model.layers.1.mlp.experts.{e}.{proj}"
            assert ck.weight_format(module) == "dense"
            assert ck.tensor(f"{module}.weight").dtype == torch.bfloat16
    with pytest.raises(KeyError, match="weight_packed"):
        ck.file_of("model.layers.1.mlp.experts.0.gate_proj.weight_packed")
    assert ck.file_of("model.layers.1.mlp.experts.0.gate_proj.weight").is_file()


# ---- hostile checkpoints: paths outside the folder, bad offsets, non-regular files, NaN weights --------
ATTN = "model.layers.0.self_attn.q_a_proj.weight"


def _set_index_entry(d, name, value):
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["language_model." + name] = value
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("value,words", [("../outside.safetensors", "outside the model folder"),
                                          ("/etc/hostname", "absolute path"),
                                          ("sub/model-00001-of-00003.safetensors", "plain file names"),
                                          (5, "non-empty string"), ("", "non-empty string")])
def test_index_paths_are_confined_to_the_model_folder(ckpt_copy, value, words):
    (ckpt_copy.parent / "outside.safetensors").write_bytes((ckpt_copy / "model-00001-of-00003.safetensors")
                                                           .read_bytes())
    _set_index_entry(ckpt_copy, NORM, value)
    with pytest.raises(CheckpointError, match=words) as e:
        Checkpoint(ckpt_copy, load_config(ckpt_copy))
    assert NORM in str(e.value) and "model.safetensors.index.json" in str(e.value)


def _edit_header(path, edit):
    """Rewrite a shard's JSON header through `edit(header)`, keeping the data section as it is."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("offsets,words", [(["0", "512"], "not two integers"), ([0.0, 512.0], "not two integers"),
                                           ([False, True], "not two integers"), ([0], "malformed header"),
                                           ("overlap", "overlap")])
def test_tensor_offsets_must_be_integers_in_bounds_and_disjoint(ckpt_copy, offsets, words):
    path = _shard_of(ckpt_copy, NORM)

    def edit(header):
        entry = header["language_model." + NORM]
        if offsets == "overlap":       # same size, starting half-way into another tensor of the shard
            other = next(v for k, v in header.items() if k != "__metadata__" and k != "language_model." + NORM
                         and v["data_offsets"][1] - v["data_offsets"][0] >= 2 * (entry["data_offsets"][1] -
                                                                                entry["data_offsets"][0]))
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            start = other["data_offsets"][0] + size // 2
            entry["data_offsets"] = [start, start + size]
        else:
            entry["data_offsets"] = offsets
    _edit_header(path, edit)
    with pytest.raises(CheckpointError, match=words) as e:
        Checkpoint(ckpt_copy, load_config(ckpt_copy))
    assert path.name in str(e.value)


def test_huge_shape_does_not_wrap_around(ckpt_copy):
    """int64 products wrap: 2**32 * 2**32 * 2 bytes must not be read as 0 bytes."""
    path = _shard_of(ckpt_copy, NORM)
    _edit_header(path, lambda h: h["language_model." + NORM].update(shape=[2**32, 2**32],
                                                                    data_offsets=[0, 0]))
    with pytest.raises(CheckpointError, match="do not hold"):
        Checkpoint(ckpt_copy, load_config(ckpt_copy))


@pytest.mark.parametrize("kind", ["fifo", "devzero", "directory", "dangling"])
def test_non_regular_shards_are_named_as_such(ckpt_copy, kind):
    import os
    path = _shard_of(ckpt_copy, NORM)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)                 # opening it would block forever: it must never be opened
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(ckpt_copy / "gone.safetensors")
    words = {"fifo": "FIFO", "devzero": "character device", "directory": "directory",
             "dangling": "broken symbolic link"}[kind]
    with pytest.raises(CheckpointError, match=words) as e:
        Checkpoint(ckpt_copy, load_config(ckpt_copy))
    assert path.name in str(e.value) and "missing" not in str(e.value)


def test_single_file_checkpoint_that_is_a_directory(tmp_path):
    d = tmp_path / "m"
    (d / "model.safetensors").mkdir(parents=True)
    config = load_config(__import__("pathlib").Path(__file__).parent / "fixtures" / "kimi-k2-thinking")
    with pytest.raises(CheckpointError, match="model.safetensors: shard file is a directory"):
        Checkpoint(d, config)


@pytest.mark.parametrize("name,value", [(NORM, float("nan")), (ATTN, float("inf")),
                                        ("model.embed_tokens.weight", float("-inf"))])
def test_non_finite_weights_are_reported_at_load_naming_the_tensor(ckpt_copy, name, value):
    t = load_file(str(_shard_of(ckpt_copy, name)))["language_model." + name].clone()
    t.view(-1)[t.numel() // 2] = value
    path = _rewrite(ckpt_copy, name, t)
    with pytest.raises(CheckpointError, match="non-finite") as e:
        _load(ckpt_copy)
    assert name in str(e.value) and path.name in str(e.value)


def test_check_finite_in_chunks_and_for_fp8(monkeypatch):
    from hybrid import checkpoint
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 7)       # odd: the bad values sit in later chunks
    t = torch.randn(5, 11)
    checkpoint.check_finite("ok", t)
    checkpoint.check_finite("ints", torch.arange(10))
    t[3, 4], t[4, 10] = float("nan"), float("inf")
    with pytest.raises(CheckpointError, match=r"x: 2 non-finite value\(s\).*flat index 37") as e:
        checkpoint.check_finite("x", t)
    assert "[5, 11]" in str(e.value)
    f8 = torch.zeros(20, dtype=torch.uint8)
    f8[13] = 0x7F                                            # e4m3fn's NaN encoding
    with pytest.raises(CheckpointError, match="flat index 13"):
        checkpoint.check_finite("f8", f8.view(torch.float8_e4m3fn))
