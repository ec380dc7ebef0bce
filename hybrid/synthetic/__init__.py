"""Synthetic checkpoints and tokenizer files in exactly the real layout, for tests, benchmarks and the demo.
checkpoint.py writes config, index, shards and (through tokenizer_files.py) the tokenizer files.
Checked by tests/test_checkpoint.py and every model test that loads one."""
from hybrid.synthetic.checkpoint import LAYOUTS, PRESETS, write_checkpoint

__all__ = ["LAYOUTS", "PRESETS", "write_checkpoint"]
