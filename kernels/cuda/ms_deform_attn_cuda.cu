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
// backward is deterministic). The gradients of locations and attention weights are deterministic. The
// backward calls PyTorch's non-determinism alert, so torch.use_deterministic_algorithms(True) raises.
//
// float32, float64, float16 and bfloat16 are supported. Arithmetic is in at::opmath_type (float32 for
// the 16-bit types, which also accumulate grad_value in a float32 buffer before the final cast).
// Locations and weights are read in that type too: the entry points convert them when needed (a
// float32 location with a 16-bit value is read as it is).
//
// Memory safety: a level is read only when level_is_readable (ms_deform_attn_sampling.h) says its rows
// lie inside value; the entry points do not copy spatial_shapes / level_start_index to the host to
// validate them (no synchronisation, capturable in a CUDA graph), so this is what keeps every read in
// bounds. Corners outside the map are skipped, never read (a clamped row may hold inf or nan).
//
// Index arithmetic is 32-bit when every tensor has fewer than kMaxIndex32 elements (64-bit integer
// division and modulo are many instructions on a GPU), else 64-bit.
//
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuBLAS/cuSPARSE headers that some CUDA
// toolkits used to build this extension do not ship; the stream and guard headers are enough.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace deformable_family {

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
// Grid-stride loops cover any size; this caps the grid well below the hardware limit.
constexpr int64_t kMaxBlocks = 65535;
// Below this, every index of a call fits in int32 including one grid stride past the end (the loop
// variable of a grid-stride loop may reach total - 1 + kMaxBlocks * kThreadsPerBlock).
constexpr int64_t kMaxIndex32 = std::numeric_limits<int32_t>::max() - kMaxBlocks * kThreadsPerBlock;

int64_t num_blocks_for(int64_t num_threads) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

bool fits_int32_indices(std::initializer_list<int64_t> numels) {
  for (const int64_t numel : numels) {
    if (numel >= kMaxIndex32) {
      return false;
    }
  }
  return true;
}

// The first thread (or warp) of this thread and the stride of a grid-stride loop, in index_t.
template <typename index_t>
__device__ __forceinline__ index_t global_thread_index() {
  return static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + static_cast<index_t>(threadIdx.x);
}
template <typename index_t>
__device__ __forceinline__ index_t grid_size() {
  return static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
}

// One thread per output element (n, q, m, d). Every element is written exactly once, so the output
// needs no zero fill.
template <typename scalar_t, typename index_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
    const at::opmath_type<scalar_t>* __restrict__ attention_weights,
    scalar_t* __restrict__ output,
    Sizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t num_rows = static_cast<index_t>(sizes.num_rows);
  const index_t num_heads = static_cast<index_t>(sizes.num_heads);
  const index_t head_dim = static_cast<index_t>(sizes.head_dim);
  const index_t num_queries = static_cast<index_t>(sizes.num_queries);
  const index_t num_levels = static_cast<index_t>(sizes.num_levels);
  const index_t num_points = static_cast<index_t>(sizes.num_points);
  const index_t total = static_cast<index_t>(sizes.batch) * num_queries * num_heads * head_dim;
  const index_t row_stride = num_heads * head_dim;
  const index_t samples_per_head = num_levels * num_points;
  for (index_t index = global_thread_index<index_t>(); index < total; index += grid_size<index_t>()) {
    const index_t d = index % head_dim;
    const index_t head_index = index / head_dim;  // into (N, Lq, M)
    const index_t m = head_index % num_heads;
    const index_t n = head_index / (num_heads * num_queries);
    const scalar_t* value_channel = value + n * num_rows * row_stride + m * head_dim + d;
    const acc_t* locations = sampling_locations + head_index * samples_per_head * 2;
    const acc_t* weights = attention_weights + head_index * samples_per_head;
    acc_t sum = 0;
    BilinearCorners<acc_t, index_t> corners;
    for (index_t l = 0; l < num_levels; ++l) {
      // Per-level constants, once per level rather than per point.
      const int64_t height = spatial_shapes[2 * l];
      const int64_t width = spatial_shapes[2 * l + 1];
      const int64_t level_start = level_start_index[l];
      if (!level_is_readable(height, width, level_start, sizes.num_rows)) {
        continue;  // an empty level (or one outside value): its samples read zero
      }
      // level_is_readable: level_start + height * width <= num_rows, so these fit in index_t.
      const scalar_t* level_channel = value_channel + static_cast<index_t>(level_start) * row_stride;
      const index_t level_height = static_cast<index_t>(height);
      const index_t level_width = static_cast<index_t>(width);
      for (index_t p = 0; p < num_points; ++p) {
        const index_t sample = l * num_points + p;
        if (!bilinear_corners(
                locations[2 * sample], locations[2 * sample + 1], level_height, level_width, index_t(0), corners)) {
          continue;
        }
        acc_t bilinear = 0;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          // Uniform across a warp whenever the warp covers channels of one head (head_dim >= 32).
          if (corners.inside[corner]) {
            bilinear += corners.weight[corner] * static_cast<acc_t>(level_channel[corners.row[corner] * row_stride]);
          }
        }
        sum += weights[sample] * bilinear;
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

// One warp per (n, q, m). grad_value_acc has the layout of value, in acc_t (a float32 buffer for the
// 16-bit types), and must be zero on entry (atomicAdd). Lane 0 writes the location and weight
// gradients of every sample, zero for a sample that reads nothing, so those need no zero fill.
template <typename scalar_t, typename index_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const at::opmath_type<scalar_t>* __restrict__ sampling_locations,
    const at::opmath_type<scalar_t>* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
    at::opmath_type<scalar_t>* __restrict__ grad_sampling_locations,
    at::opmath_type<scalar_t>* __restrict__ grad_attention_weights,
    Sizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t num_rows = static_cast<index_t>(sizes.num_rows);
  const index_t num_heads = static_cast<index_t>(sizes.num_heads);
  const index_t head_dim = static_cast<index_t>(sizes.head_dim);
  const index_t num_queries = static_cast<index_t>(sizes.num_queries);
  const index_t num_levels = static_cast<index_t>(sizes.num_levels);
  const index_t num_points = static_cast<index_t>(sizes.num_points);
  const index_t num_groups = static_cast<index_t>(sizes.batch) * num_queries * num_heads;
  const index_t row_stride = num_heads * head_dim;
  const index_t samples_per_head = num_levels * num_points;
  const int lane = threadIdx.x % kWarpSize;
  const index_t warps_per_grid = grid_size<index_t>() / kWarpSize;
  // The whole warp shares head_index, so every branch below is uniform across its lanes and the
  // full-mask shuffles are safe.
  for (index_t head_index = global_thread_index<index_t>() / kWarpSize; head_index < num_groups;
       head_index += warps_per_grid) {
    const index_t m = head_index % num_heads;
    const index_t n = head_index / (num_heads * num_queries);
    const index_t head_offset = n * num_rows * row_stride + m * head_dim;
    const scalar_t* grad_out = grad_output + head_index * head_dim;
    BilinearCorners<acc_t, index_t> corners;
    for (index_t l = 0; l < num_levels; ++l) {
      const index_t first_sample = head_index * samples_per_head + l * num_points;  // into (N, Lq, M, L, P)
      const int64_t height = spatial_shapes[2 * l];
      const int64_t width = spatial_shapes[2 * l + 1];
      const int64_t level_start = level_start_index[l];
      if (!level_is_readable(height, width, level_start, sizes.num_rows)) {
        // An empty level: its samples read zero, so all their gradients are zero.
        for (index_t p = lane; p < num_points; p += kWarpSize) {
          grad_sampling_locations[2 * (first_sample + p)] = 0;
          grad_sampling_locations[2 * (first_sample + p) + 1] = 0;
          grad_attention_weights[first_sample + p] = 0;
        }
        continue;
      }
      const index_t level_offset = head_offset + static_cast<index_t>(level_start) * row_stride;
      const index_t level_height = static_cast<index_t>(height);
      const index_t level_width = static_cast<index_t>(width);
      const acc_t width_f = static_cast<acc_t>(width);
      const acc_t height_f = static_cast<acc_t>(height);
      for (index_t p = 0; p < num_points; ++p) {
        const index_t sample = first_sample + p;
        if (!bilinear_corners(
                sampling_locations[2 * sample], sampling_locations[2 * sample + 1], level_height, level_width,
                index_t(0), corners)) {
          if (lane == 0) {  // no corner inside: gradients are zero
            grad_sampling_locations[2 * sample] = 0;
            grad_sampling_locations[2 * sample + 1] = 0;
            grad_attention_weights[sample] = 0;
          }
          continue;
        }
        const acc_t attention = attention_weights[sample];
        acc_t dot[4] = {0, 0, 0, 0};
        for (index_t d = lane; d < head_dim; d += kWarpSize) {
          const acc_t grad = static_cast<acc_t>(grad_out[d]);
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            if (corners.inside[corner]) {  // uniform across the warp
              const index_t offset = level_offset + corners.row[corner] * row_stride + d;
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
          grad_attention_weights[sample] = corners.weight[0] * dot[0] + corners.weight[1] * dot[1] +
              corners.weight[2] * dot[2] + corners.weight[3] * dot[3];
          // d sample / d px = (1 - fy) (v1 - v0) + fy (v3 - v2), and px = x * W - 0.5 (likewise y).
          const acc_t fx = corners.frac_x;
          const acc_t fy = corners.frac_y;
          grad_sampling_locations[2 * sample] =
              attention * width_f * ((1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]));
          grad_sampling_locations[2 * sample + 1] =
              attention * height_f * ((1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]));
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
  // Every element is written by the kernel (zero for queries that read nothing): no zero fill.
  at::Tensor output = at::empty({sizes.batch, sizes.num_queries, sizes.num_heads * sizes.head_dim}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  // Locations and weights in the arithmetic type: float32 ones with a 16-bit value are used as they are.
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.to(acc_type).contiguous();
  const at::Tensor weights_c = attention_weights.to(acc_type).contiguous();
  const bool int32_indices = fits_int32_indices({value.numel(), locations_c.numel(), output.numel()});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, index_t><<<num_blocks_for(output.numel()), kThreadsPerBlock, 0, stream>>>(
          value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
          locations_c.data_ptr<acc_t>(), weights_c.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), sizes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (int32_indices) {
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
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
  // As PyTorch's own atomicAdd-based backward kernels (index_add_, scatter_add_, ...): raises under
  // torch.use_deterministic_algorithms(True), warns with warn_only=True.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Sizes sizes = sizes_of(value, sampling_locations);
  const at::ScalarType acc_type = at::toOpMathType(value.scalar_type());
  // grad_value is accumulated with atomicAdd, so it starts at zero; float32 / float64 accumulate
  // straight into it, the 16-bit types into a float32 buffer. The location and weight gradients are
  // written once per sample by the kernel (no zero fill), in acc_type, then cast to their inputs' dtypes.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations_acc = at::empty(sampling_locations.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_weights_acc = at::empty(attention_weights.sizes(), value.options().dtype(acc_type));
  const int64_t num_groups = sizes.batch * sizes.num_queries * sizes.num_heads;
  if (grad_weights_acc.numel() > 0) {
    const at::Tensor value_c = value.contiguous();
    const at::Tensor shapes_c = spatial_shapes.contiguous();
    const at::Tensor starts_c = level_start_index.contiguous();
    const at::Tensor locations_c = sampling_locations.to(acc_type).contiguous();
    const at::Tensor weights_c = attention_weights.to(acc_type).contiguous();
    const at::Tensor grad_output_c = grad_output.contiguous();
    const bool int32_indices =
        fits_int32_indices({value.numel(), locations_c.numel(), grad_output.numel(), num_groups * kWarpSize});
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto launch = [&](auto index_zero) {
            using index_t = decltype(index_zero);
            backward_kernel<scalar_t, index_t><<<num_blocks_for(num_groups * kWarpSize), kThreadsPerBlock, 0, stream>>>(
                value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
                locations_c.data_ptr<acc_t>(), weights_c.data_ptr<acc_t>(), grad_output_c.data_ptr<scalar_t>(),
                grad_value_acc.data_ptr<acc_t>(), grad_locations_acc.data_ptr<acc_t>(),
                grad_weights_acc.data_ptr<acc_t>(), sizes);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          if (int32_indices) {
            launch(int32_t(0));
          } else {
            launch(int64_t(0));
          }
        });
  }
  // .to() returns the tensor itself when the dtype already matches.
  return {
      grad_value_acc.to(value.scalar_type()), grad_locations_acc.to(sampling_locations.scalar_type()),
      grad_weights_acc.to(attention_weights.scalar_type())};
}

}  // namespace deformable_family
