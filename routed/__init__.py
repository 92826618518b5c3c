"""routed: run DeepSeek-V3-family MoE models cheaply, with routing you can see."""

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.llm import LLM, CompletionOutput
from routed.loader import load_model
from routed.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "ModelConfig", "RoutedError", "SamplingParams", "load_model"]
__version__ = "0.1.0"
