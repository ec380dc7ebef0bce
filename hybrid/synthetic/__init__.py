"""Synthetic checkpoints and tokenizer files in exactly the real layout, for tests, benchmarks and the demo.
checkpoint.py writes config, index, shards and (through tokenizer_files.py) the tokenizer files."""
from hybrid.synthetic.checkpoint import LAYOUTS, PRESETS, write_checkpoint

__all__ = ["LAYOUTS", "PRESETS", "write_checkpoint"]
