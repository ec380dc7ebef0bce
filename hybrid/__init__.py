"""hybrid: CPU/GPU hybrid inference for Kimi K2.6 / K2.5 / K2-Thinking / DeepSeek-V3 checkpoints.
Checked end to end by tests/test_engine.py and tests/test_model.py."""
from hybrid.config import ConfigError, ModelConfig, load_config
from hybrid.checkpoint import CheckpointError
from hybrid.engine import RequestOutput
from hybrid.llm import LLM
from hybrid.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "Tokenizer", "ModelConfig", "load_config", "ConfigError",
           "CheckpointError"]


def __getattr__(name):
    if name == "Tokenizer":
        from hybrid.text.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)
