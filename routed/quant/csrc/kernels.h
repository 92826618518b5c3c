// routed's weight kernels (int_dot.cpp), for the native one-token layer (layer.cpp) to call without the dispatcher.
#pragma once
#include <ATen/ATen.h>

namespace routed {

at::Tensor int8_dot(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor int4_dot(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_zeros, int64_t group);
at::Tensor bf16_dot(const at::Tensor& x, const at::Tensor& w);
at::Tensor int8_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& gate_scale, const at::Tensor& up, const at::Tensor& up_scale,
                        const at::Tensor& down, const at::Tensor& down_scale);
at::Tensor int4_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                        const at::Tensor& gate_up, const at::Tensor& gate_up_sz, const at::Tensor& down,
                        const at::Tensor& down_sz, int64_t group);
at::Tensor bf16_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                        const at::Tensor& up, const at::Tensor& down);

}  // namespace routed
