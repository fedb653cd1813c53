// CUDA kernels of multi-scale deformable sampling (interface and semantics: ms_deform_attn.h).
//
// Forward: one thread per output element (batch, query, head, channel), so the threads of a warp read
// consecutive channels of a value row (coalesced); the corner weights of a sample are recomputed per
// thread, which is cheap next to the four gathers.
//
// Backward: one warp per (batch, query, head); its lanes split the channels. For each sample the warp
// adds weight * grad_output to the four corner rows of grad_value with atomicAdd and reduces the four
// dot products <grad_output, corner row> with warp shuffles, from which lane 0 writes the gradients
// of the location and the attention weight.
//
// NOT deterministic: atomicAdd accumulates grad_value in an order that varies between runs (the CPU
// backward is deterministic). The gradients of locations and attention weights are deterministic.
//
// float32, float64, float16 and bfloat16 are supported. Arithmetic is in at::opmath_type (float32 for
// the 16-bit types, which also accumulate grad_value in a float32 buffer before the final cast).
//
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuBLAS/cuSPARSE headers that some CUDA
// toolkits used to build this extension do not ship; the stream and guard headers are enough.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace deformable_family {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Grid-stride loops cover any size; this caps the grid well below the hardware limit.
constexpr int64_t kMaxBlocks = 65535;

int64_t num_blocks_for(int64_t num_threads) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

template <typename scalar_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    scalar_t* __restrict__ output,
    Sizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = sizes.batch * sizes.num_queries * sizes.num_heads * sizes.head_dim;
  const int64_t row_stride = sizes.num_heads * sizes.head_dim;
  const int64_t samples_per_head = sizes.num_levels * sizes.num_points;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = index % sizes.head_dim;
    const int64_t head_index = index / sizes.head_dim;  // into (N, Lq, M)
    const int64_t m = head_index % sizes.num_heads;
    const int64_t n = head_index / (sizes.num_heads * sizes.num_queries);
    const scalar_t* value_channel = value + n * sizes.num_rows * row_stride + m * sizes.head_dim + d;
    const scalar_t* locations = sampling_locations + head_index * samples_per_head * 2;
    const scalar_t* weights = attention_weights + head_index * samples_per_head;
    acc_t sum = 0;
    BilinearCorners<acc_t> corners;
    for (int64_t l = 0; l < sizes.num_levels; ++l) {
      const int64_t height = spatial_shapes[2 * l];
      const int64_t width = spatial_shapes[2 * l + 1];
      const int64_t level_start = level_start_index[l];
      for (int64_t p = 0; p < sizes.num_points; ++p) {
        const int64_t sample = l * sizes.num_points + p;
        const acc_t x = static_cast<acc_t>(locations[2 * sample]);
        const acc_t y = static_cast<acc_t>(locations[2 * sample + 1]);
        if (!bilinear_corners(x, y, height, width, level_start, corners)) {
          continue;
        }
        acc_t bilinear = 0;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          // Outside corners have weight 0 and a clamped (valid) row.
          bilinear += corners.weight[corner] * static_cast<acc_t>(value_channel[corners.row[corner] * row_stride]);
        }
        sum += static_cast<acc_t>(weights[sample]) * bilinear;
      }
    }
    output[index] = static_cast<scalar_t>(sum);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // complete in lane 0
}

// grad_value_acc has the layout of value, in acc_t (a float32 buffer for the 16-bit types).
template <typename scalar_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
    scalar_t* __restrict__ grad_sampling_locations,
    scalar_t* __restrict__ grad_attention_weights,
    Sizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_groups = sizes.batch * sizes.num_queries * sizes.num_heads;
  const int64_t row_stride = sizes.num_heads * sizes.head_dim;
  const int64_t samples_per_head = sizes.num_levels * sizes.num_points;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  // The whole warp shares head_index, so every branch below is uniform across its lanes and the
  // full-mask shuffles are safe.
  for (int64_t head_index = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
       head_index < num_groups; head_index += warps_per_grid) {
    const int64_t m = head_index % sizes.num_heads;
    const int64_t n = head_index / (sizes.num_heads * sizes.num_queries);
    const int64_t head_offset = n * sizes.num_rows * row_stride + m * sizes.head_dim;
    const scalar_t* grad_out = grad_output + head_index * sizes.head_dim;
    BilinearCorners<acc_t> corners;
    for (int64_t l = 0; l < sizes.num_levels; ++l) {
      const int64_t height = spatial_shapes[2 * l];
      const int64_t width = spatial_shapes[2 * l + 1];
      const int64_t level_start = level_start_index[l];
      for (int64_t p = 0; p < sizes.num_points; ++p) {
        const int64_t sample = head_index * samples_per_head + l * sizes.num_points + p;  // into (N, Lq, M, L, P)
        const acc_t x = static_cast<acc_t>(sampling_locations[2 * sample]);
        const acc_t y = static_cast<acc_t>(sampling_locations[2 * sample + 1]);
        if (!bilinear_corners(x, y, height, width, level_start, corners)) {
          continue;  // no corner inside: gradients stay zero
        }
        const acc_t attention = static_cast<acc_t>(attention_weights[sample]);
        acc_t dot[4] = {0, 0, 0, 0};
        for (int64_t d = lane; d < sizes.head_dim; d += kWarpSize) {
          const acc_t grad = static_cast<acc_t>(grad_out[d]);
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (corners.inside[corner]) {  // uniform across the warp
              const int64_t offset = head_offset + corners.row[corner] * row_stride + d;
              dot[corner] += grad * static_cast<acc_t>(value[offset]);
              atomicAdd(grad_value_acc + offset, attention * corners.weight[corner] * grad);
            }
          }
        }
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          dot[corner] = warp_sum(dot[corner]);
        }
        if (lane == 0) {
          grad_attention_weights[sample] = static_cast<scalar_t>(
              corners.weight[0] * dot[0] + corners.weight[1] * dot[1] + corners.weight[2] * dot[2] +
              corners.weight[3] * dot[3]);
          // d sample / d px = (1 - fy) (v1 - v0) + fy (v3 - v2), and px = x * W - 0.5 (likewise y).
          const acc_t fx = corners.frac_x;
          const acc_t fy = corners.frac_y;
          grad_sampling_locations[2 * sample] = static_cast<scalar_t>(
              attention * static_cast<acc_t>(width) * ((1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2])));
          grad_sampling_locations[2 * sample + 1] = static_cast<scalar_t>(
              attention * static_cast<acc_t>(height) * ((1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1])));
        }
      }
    }
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, {});
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes sizes = sizes_of(value, sampling_locations);
  at::Tensor output = at::zeros({sizes.batch, sizes.num_queries, sizes.num_heads * sizes.head_dim}, value.options());
  if (output.numel() == 0 || sizes.num_rows == 0) {
    return output;
  }
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks_for(output.numel()), kThreadsPerBlock, 0, stream>>>(
        value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
        locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), sizes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.defined(), "ms_deform_attn_backward: grad_output is undefined");
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes sizes = sizes_of(value, sampling_locations);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  // float32 / float64 accumulate straight into grad_value; 16-bit types into a float32 buffer.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_sampling_locations = at::zeros(sampling_locations.sizes(), value.options());
  at::Tensor grad_attention_weights = at::zeros(attention_weights.sizes(), value.options());
  const int64_t num_groups = sizes.batch * sizes.num_queries * sizes.num_heads;
  if (grad_attention_weights.numel() > 0 && value.numel() > 0) {
    const at::Tensor value_c = value.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous();
    const at::Tensor starts_c = level_start_index.contiguous();
    const at::Tensor locations_c = sampling_locations.contiguous();
    const at::Tensor weights_c = attention_weights.contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t><<<num_blocks_for(num_groups * kWarpSize), kThreadsPerBlock, 0, stream>>>(
              value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
              locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), grad_output_c.data_ptr<scalar_t>(),
              grad_value_acc.data_ptr<acc_t>(), grad_sampling_locations.data_ptr<scalar_t>(),
              grad_attention_weights.data_ptr<scalar_t>(), sizes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type() ? grad_value_acc
                                                                              : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace deformable_family
