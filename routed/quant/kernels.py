"""routed's own CPU kernels (`csrc/`), built at first use by `torch.utils.cpp_extension` and registered as
PyTorch operators (`torch.ops.routed.*`), which a compiled step calls like any ATen kernel.

Only where PyTorch has nothing as fast: on x86 CPUs with AVX2 but without AVX-512 (AMD Zen 2/3, older Intel),
PyTorch's one-row int8 product (`_weight_int8pack_mm`) widens every weight to fp32 and is compute-bound at
~5.5-7 GB/s; `int8_dot` multiplies 8-bit activations by the int8 weights as integer dot products and reads the
weights at 9-16 GB/s (`csrc/int_dot.cpp`, BENCHMARKS.md); `int4_dot` does the same for int4 weights, read in
PyTorch's AVX2 packing (1.3-1.6x `_weight_int4pack_mm_for_cpu` from ~1500 rows on); `bf16_dot`, one bf16 row
(decode's products and lm_head) with fp32 sums, reads at 1.2-1.4x inductor's fused loop and PyTorch's GEMV there.
`bf16_experts` / `int8_experts` / `int4_experts` run a MoE layer's chosen experts for a few tokens in one call
(`RoutedExperts._fused`). The same build holds the native one-token layer (`csrc/layer.cpp`, a Python module:
`module.DecodeLayer`, `routed.model.native`). The build takes ~50 s once per machine (the extension cache, `TORCH_EXTENSIONS_DIR`,
default `~/.cache/torch_extensions`); without a C++ compiler it warns once and PyTorch's kernels (and inductor's
loops) stay. `ROUTED_NO_KERNELS=1` turns them off.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "int_dot.cpp", CSRC / "layer.cpp"]
# Where the kernels run: AVX2 CPUs without AVX-512 (measured there). With AVX-512, inductor's fused int8 loop
# reads at the bandwidth (`intq.FUSED_INT8_LOADS`) and FBGEMM has VNNI's 32-bit sums.
WANTED = platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "AVX2"
# Set once `int_dot()` has loaded the kernels: what a compiled region reads (it cannot call the builder)
INT8_DOT = False
INT4_DOT = False
BF16_DOT = False
_registered: list[bool] = []
# The built extension as a Python module (`DecodeLayer`, routed/model/native.py), once `int_dot()` has loaded it
module = None


@functools.cache
def int_dot() -> bool:
    """Whether routed's kernels (`torch.ops.routed.int8_dot`, `int4_dot`, `bf16_dot`, ...) are there: built (or
    found in the extension cache) and loaded."""
    if not WANTED or os.environ.get("ROUTED_NO_KERNELS"):
        return False
    from torch.utils.cpp_extension import load

    log.info("building routed's CPU kernels (once per machine, ~50 s)")
    try:
        built = load(name="routed_int_dot", sources=[str(s) for s in SOURCES],
                     extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], is_python_module=True, verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, no ninja, a failed build
        log.warning("routed's int8/int4 kernels could not be built (%s); int8 and int4 products stay on PyTorch's "
                    "kernels", str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__)
        return False

    if not _registered:  # once per process (the builder's cache can be cleared, the registration cannot)
        torch.library.register_fake("routed::int8_dot")(
            lambda x, w, scale: x.new_empty(*x.shape[:-1], w.shape[0]))
        torch.library.register_fake("routed::int4_dot")(
            lambda x, packed, scales_zeros, group: x.new_empty(*x.shape[:-1], packed.shape[0]))
        torch.library.register_fake("routed::bf16_dot")(lambda x, w: x.new_empty(*x.shape[:-1], w.shape[0]))
        for op in ("bf16_experts", "int8_experts", "int4_experts"):  # a layer's experts: fp32 [tokens, D]
            torch.library.register_fake(f"routed::{op}")(
                lambda x, ids, weights, *w: x.new_empty(x.shape, dtype=torch.float32))
        _registered.append(True)
    from routed.quant.intq import _packed_block

    global INT8_DOT, INT4_DOT, BF16_DOT, module
    INT8_DOT = BF16_DOT = True
    module = built
    INT4_DOT = _packed_block() == 32  # int4_dot reads PyTorch's AVX2 packing in place
    return True
