"""hybrid: CPU/GPU hybrid inference for Kimi K2.6 / K2.5 / K2-Thinking / DeepSeek-V3 checkpoints."""
from .config import ConfigError, ModelConfig, load_config
from .checkpoint import CheckpointError
from .engine import RequestOutput
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "Tokenizer", "ModelConfig", "load_config", "ConfigError",
           "CheckpointError"]


def __getattr__(name):
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)
