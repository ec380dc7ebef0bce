"""hybrid: CPU/GPU hybrid inference for Kimi K2.6 / K2.5 / K2-Thinking / DeepSeek-V3 checkpoints."""
from .config import ConfigError, ModelConfig, load_config
from .checkpoint import CheckpointError
from .engine import LLM

__all__ = ["LLM", "ModelConfig", "load_config", "ConfigError", "CheckpointError"]
