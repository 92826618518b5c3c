"""routed: run DeepSeek-V3-family MoE models cheaply, with routing you can see."""

from routed.malloc import cap_kernel_caches

cap_kernel_caches()  # before any matmul of the process: the kernel caches read their capacity once

from routed.config import ModelConfig  # noqa: E402
from routed.errors import RoutedError  # noqa: E402
from routed.llm import LLM, CompletionOutput  # noqa: E402
from routed.loader import load_model  # noqa: E402
from routed.sampling import SamplingParams  # noqa: E402

__all__ = ["LLM", "CompletionOutput", "ModelConfig", "RoutedError", "SamplingParams", "load_model"]
__version__ = "0.1.0"
