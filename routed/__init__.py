"""routed: run DeepSeek-V3-family MoE models cheaply, with routing you can see."""

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.loader import load_model

__all__ = ["ModelConfig", "RoutedError", "load_model"]
__version__ = "0.1.0"
