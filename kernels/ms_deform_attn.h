// Multi-scale deformable sampling (Deformable DETR, Zhu et al. 2021, Eq. 3): the interface of the
// compiled op. Everything in kernels/ implements or registers what this header declares.
//
// Tensors (N batch, S = sum_l H_l * W_l value rows, M heads, D channels per head, Lq queries,
// L levels, P points per level and head):
//   value               (N, S, M, D)        float32, float64, float16 or bfloat16; levels flattened
//                                           row-major, concatenated in level order
//   spatial_shapes      (L, 2) int64        (H_l, W_l), on the device of value; H_l or W_l may be 0
//   level_start_index   (L,)   int64        first row of level l in S, on the device of value
//   sampling_locations  (N, Lq, M, L, P, 2) the dtype of value, or float32 with a 16-bit value;
//                                           normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)    the dtype of value, or float32 with a 16-bit value; need
//                                           not sum to one
//   output              (N, Lq, M * D)      the dtype of value
// Arithmetic is in float32 for the 16-bit types (locations and weights are read in float32, so a
// float32 location keeps its precision), else in the dtype of value. Gradients have the dtypes of
// their inputs.
//
// Semantics: bilinear grid_sample with align_corners=False and zero padding. Location (x, y) maps to
// the continuous pixel coordinate (x * W_l - 0.5, y * H_l - 0.5), so pixel centres sit at
// ((i + 0.5) / W_l, (j + 0.5) / H_l). A corner outside the map contributes zero; a location whose
// coordinate is not finite, or lies at least one pixel outside the map, contributes zero as well
// (its gradients are zero too). Samples on an empty level (H_l or W_l = 0) read zero, as outside the
// map.
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
// Memory safety: every kernel reads a level only when its rows lie inside value
// (level_is_readable in ms_deform_attn_sampling.h), whatever spatial_shapes and level_start_index
// hold; a level that does not is skipped (its samples read zero).
//
// Determinism: the CPU backward is deterministic (bit-identical across runs and thread counts). The
// CUDA backward is NOT: it accumulates grad_value with atomicAdd, whose order varies between runs; it
// calls at::globalContext().alertNotDeterministic, so torch.use_deterministic_algorithms(True) makes
// it raise (or warn with warn_only=True), as PyTorch's own atomicAdd-based kernels do.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace deformable_family {

// Validates ranks, shapes, dtypes and devices of the inputs (and grad_output when defined). Throws
// c10::TypeError (Python TypeError) or c10::ValueError (Python ValueError) naming the argument at
// fault. On the CPU it also checks that spatial_shapes and level_start_index describe exactly S rows
// (their values are in host memory). On other devices their values are NOT read: that would be a
// device-to-host copy and a synchronisation on every call, and would break CUDA graph capture. Python's
// ms_deform_attn checks them from host values instead (spatial_shapes_list), and the kernels never read
// outside value whatever they hold (see "Memory safety" above).
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// CPU kernels: float32 and float64 natively; float16 and bfloat16 computed in float32 (on converted copies).
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
