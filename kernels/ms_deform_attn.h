// Multi-scale deformable sampling (Deformable DETR, Zhu et al. 2021, Eq. 3): the interface of the
// compiled op. Everything in kernels/ implements or registers what this header declares.
//
// Tensors (N batch, S = sum_l H_l * W_l value rows, M heads, D channels per head, Lq queries,
// L levels, P points per level and head):
//   value               (N, S, M, D)        float; levels flattened row-major, concatenated in level order
//   spatial_shapes      (L, 2) int64        (H_l, W_l), on the device of value
//   level_start_index   (L,)   int64        first row of level l in S, on the device of value
//   sampling_locations  (N, Lq, M, L, P, 2) same dtype as value; normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)    same dtype as value; need not sum to one
//   output              (N, Lq, M * D)
//
// Semantics: bilinear grid_sample with align_corners=False and zero padding. Location (x, y) maps to
// the continuous pixel coordinate (x * W_l - 0.5, y * H_l - 0.5), so pixel centres sit at
// ((i + 0.5) / W_l, (j + 0.5) / H_l). A corner outside the map contributes zero; a location whose
// coordinate is not finite, or lies at least one pixel outside the map, contributes zero as well
// (its gradients are zero too).
//
// Operators (schemas in ms_deform_attn_ops.cpp):
//   deformable_family::ms_deform_attn(value, spatial_shapes, level_start_index,
//                                     sampling_locations, attention_weights) -> output
//   deformable_family::ms_deform_attn_backward(value, spatial_shapes, level_start_index,
//                                              sampling_locations, attention_weights, grad_output)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
// Autograd and the fake (meta) implementations are registered from Python
// (deformable_family/layers/ms_deform_attn_op.py).
//
// Determinism: the CPU backward is deterministic (bit-identical across runs and thread counts). The
// CUDA backward is NOT: it accumulates grad_value with atomicAdd, whose order varies between runs.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace deformable_family {

// Validates ranks, shapes, dtypes and devices of the inputs (and grad_output when defined), and that
// spatial_shapes and level_start_index describe exactly S rows. Throws c10::TypeError (Python
// TypeError) or c10::ValueError (Python ValueError) naming the argument at fault. For CUDA inputs the
// check copies the tiny spatial_shapes and level_start_index to the host once (one synchronisation).
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// CPU kernels: float32 and float64 natively; float16 and bfloat16 computed in float32.
at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
// CUDA kernels: float32, float64, float16 and bfloat16, accumulating in float32 (float64 for float64).
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace deformable_family
