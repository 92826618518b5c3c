"""The DeepSeek-V3 architecture (deepseek_v3.py), its attention paths and its expert execution."""

from routed.model.deepseek_v3 import Transformer

__all__ = ["Transformer"]
