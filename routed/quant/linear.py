"""Quantized linear layers and the model-wide conversion to int8 / int4 weights.

`quantize_model(model, fmt)` turns every linear of attention, dense MLPs, shared experts, routed experts and
the lm_head into weight-only int8 or int4; it leaves the router (fp32, spec trap 1), `kv_b_proj` (whose W_UK
/ W_UV halves the absorbed attention folds, spec trap 13), norms and the embedding alone. With
`from_weights=False` it only reshapes the module tree (empty buffers) so a quantized checkpoint can be
loaded into it; `finalize_model` then packs int4 weights for the CPU kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from routed.malloc import release_freed_memory
from routed.quant import kernels
from routed.quant.intq import (IntFormat, int4_fits, int4_linear, int8_linear, int8_rows_linear, pack_int4,
                               pack_int8_rows, quantize_int4, quantize_int8)

KEEP_FLOAT = ("kv_b_proj",)


def own_bytes(module: nn.Module) -> int:
    """Bytes of a module's own tensors, packed int4 weights (held outside parameters and buffers) included."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    packed = getattr(module, "_packed", None)
    if isinstance(packed, torch.Tensor):
        tensors.append(packed)
    elif isinstance(packed, dict):
        tensors += list(packed.values())  # RoutedExperts: one stacked tensor per projection
    return sum(t.numel() * t.element_size() for t in tensors) + getattr(module, "_rows_bytes", 0)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every weight a model holds in memory, in whatever format it holds them."""
    return sum(own_bytes(m) for m in model.modules())


class QLinear(nn.Module):
    """y = x Wᵀ with W stored as int8 (per channel) or int4 (group-wise); no bias (DeepSeek has none)."""

    def __init__(self, in_features: int, out_features: int, fmt: IntFormat) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        if fmt.bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32))
        else:
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("scales_zeros", torch.empty(in_features // fmt.group_size, out_features, 2,
                                                             dtype=torch.bfloat16))
        self._packed: torch.Tensor | None = None
        self._rows: object | None = None  # int8 lm_head: FBGEMM's packed weight (pack_rows_)
        self._rows_bytes = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: IntFormat) -> QLinear:
        q = cls(linear.in_features, linear.out_features, fmt)
        if fmt.bits == 8:
            q.qweight, q.scales = quantize_int8(linear.weight.data)
        else:
            q.qweight, q.scales_zeros = quantize_int4(linear.weight.data, fmt.group_size)
        return q

    def finalize_(self) -> None:
        if self.fmt.bits == 4 and self._packed is None:
            self._packed = pack_int4(self.qweight)
            self.qweight = torch.empty(0, dtype=torch.uint8)

    def pack_rows_(self) -> None:
        """int8: run from now on through `int8_rows_linear` (8-bit activations per row, integer dot products);
        the packed copy replaces `qweight`. For the lm_head, the one large product outside the compiled decode
        block (which reads `qweight` itself). Stays on the weight-only kernels where FBGEMM is missing, and on
        routed's own integer dot products where they run (AVX2 without VNNI, where FBGEMM's 16-bit sums force
        7-bit activations: `kernels.int_dot`)."""
        if self.fmt.bits != 8 or self._rows is not None or kernels.int_dot():
            return
        if (rows := pack_int8_rows(self.qweight, self.scales)) is not None:
            self._rows, self._rows_bytes = rows, self.qweight.numel() + 2 * self.out_features
            self.qweight = torch.empty(0, dtype=torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            return int8_rows_linear(x, self._rows, self.out_features)
        if self.fmt.bits == 8:
            return int8_linear(x, self.qweight, self.scales)
        return int4_linear(x, self._packed, self.scales_zeros, self.fmt.group_size, self.out_features)


def quantize_model(model: nn.Module, fmt: IntFormat, from_weights: bool = True) -> None:
    from routed.model.experts import RoutedExperts

    for module in list(model.modules()):
        if isinstance(module, RoutedExperts):
            E, N, K = module.gate_proj.shape
            if fmt.bits == 8 or (int4_fits(N, K, fmt.group_size) and int4_fits(K, N, fmt.group_size)):
                module.quantize_(fmt, from_weights)
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in KEEP_FLOAT:
                if fmt.bits == 4 and not int4_fits(child.out_features, child.in_features, fmt.group_size):
                    continue  # the int4 kernel cannot take this shape: it stays in the model dtype
                setattr(module, name, QLinear.from_linear(child, fmt) if from_weights
                        else QLinear(child.in_features, child.out_features, fmt))


def merge_int4_gate_up_(mlp: nn.Module) -> None:
    """An int4 SwiGLU MLP's gate and up projections as one `gate_up_proj` QLinear (one kernel call for both,
    as the routed experts' `finalize_`); `MLP.forward` takes it when present. Other formats stay as they are."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not (isinstance(gate, QLinear) and isinstance(up, QLinear) and gate.fmt.bits == 4 and gate.fmt == up.fmt
            and gate._packed is None and up._packed is None):
        return
    merged = QLinear(gate.in_features, gate.out_features + up.out_features, gate.fmt)
    merged.qweight = torch.cat([gate.qweight, up.qweight])
    merged.scales_zeros = torch.cat([gate.scales_zeros, up.scales_zeros], dim=1)
    del mlp.gate_proj, mlp.up_proj
    mlp.gate_up_proj = merged


def finalize_model(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Pack int4 weights for the CPU kernel (a SwiGLU's gate and up as one weight); int8 scales in `dtype` (the
    model's: the one-row products round them to it, and the int8 kernel takes them in it — in a compiled step, as
    they are held), so that every path multiplies the same weights; an int8 lm_head for 8-bit-activation products
    (`pack_rows_`)."""
    from routed.model.deepseek_v3 import MLP
    from routed.model.experts import RoutedExperts

    for module in list(model.modules()):
        if isinstance(module, MLP):
            merge_int4_gate_up_(module)
        if getattr(module, "fmt", None) is not None:
            kernels.int_dot()  # built (or loaded) now, before a compiled step reads whether it is there
    for module in model.modules():
        if isinstance(module, (QLinear, RoutedExperts)):
            module.finalize_()
            if isinstance(module, RoutedExperts) and module.fmt is not None and module.fmt.bits == 4:
                # the layer's unpacked weights (heap blocks below the mmap threshold), freed: back to the system
                # now, not held to the end of the load by `keep_freed_memory`'s thresholds (the load's peak)
                release_freed_memory()
            for name, buf in list(module.named_buffers(recurse=False)) if dtype is not None else []:
                if name.endswith("scales"):  # int8's (int4's are `scales_zeros`)
                    setattr(module, name, buf.to(dtype))
    if isinstance(head := getattr(model, "lm_head", None), QLinear):
        head.pack_rows_()
