// CPU kernels of multi-scale deformable sampling (interface and semantics: ms_deform_attn.h).
//
// Forward: parallel over blocks of (batch, query); per sample the four corner rows and the four
// weights (bilinear * attention) are computed once, then one loop over the D channels of a head
// accumulates w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d], which the compiler vectorises.
//
// Backward: parallel over (batch, head) pairs, or (batch, head, level) triples when there are few
// pairs for the threads. The corners of a level-l sample are rows of level l, so each unit owns a
// disjoint slice of grad_value (rows of its levels, head m, batch n) and the gradients of its own
// locations and attention weights. Each thread walks its queries in order, so the result is
// deterministic: bit-identical across runs and thread counts, no atomics. With the Deformable DETR
// shapes there are N * 8 * 4 triples; a machine with many more cores does not use them all.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

// On x86-64 Linux with GCC the two hot loops are also compiled for AVX2 + FMA (x86-64-v3) and the
// best version is chosen when the library loads, so one binary runs everywhere and uses wide vectors
// where they exist. Results may then differ in the last bits between machines (FMA rounding), never
// between runs on one machine.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define DF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DF_CPU_CLONES
#endif

namespace deformable_family {

namespace {

// output[d] += sum_c weight[c] * corner_row_c[d] over the D channels of one head.
template <typename scalar_t>
inline void accumulate_sample(
    scalar_t* __restrict__ output,
    const scalar_t* __restrict__ row0,
    const scalar_t* __restrict__ row1,
    const scalar_t* __restrict__ row2,
    const scalar_t* __restrict__ row3,
    scalar_t w0,
    scalar_t w1,
    scalar_t w2,
    scalar_t w3,
    int64_t head_dim) {
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) {
    output[d] += w0 * row0[d] + w1 * row1[d] + w2 * row2[d] + w3 * row3[d];
  }
}

// Forward of the (batch, query) pairs [begin, end) of the flattened (N, Lq).
template <typename scalar_t>
DF_CPU_CLONES void forward_queries(
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const scalar_t* sampling_locations,
    const scalar_t* attention_weights,
    const uint8_t* level_readable,
    scalar_t* output,
    const Sizes& sizes,
    int64_t begin,
    int64_t end) {
  const int64_t row_stride = sizes.num_heads * sizes.head_dim;  // between consecutive value rows
  const int64_t samples_per_head = sizes.num_levels * sizes.num_points;
  BilinearCorners<scalar_t> corners;
  for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
    const int64_t n = batch_query / sizes.num_queries;
    for (int64_t m = 0; m < sizes.num_heads; ++m) {
      const int64_t head_index = batch_query * sizes.num_heads + m;  // into (N, Lq, M)
      const scalar_t* value_head = value + (n * sizes.num_rows * sizes.num_heads + m) * sizes.head_dim;
      const scalar_t* locations = sampling_locations + head_index * samples_per_head * 2;
      const scalar_t* weights = attention_weights + head_index * samples_per_head;
      scalar_t* out = output + head_index * sizes.head_dim;
      for (int64_t l = 0; l < sizes.num_levels; ++l) {
        const int64_t height = spatial_shapes[2 * l];
        const int64_t width = spatial_shapes[2 * l + 1];
        const int64_t level_start = level_start_index[l];
        if (!level_readable[l]) {
          continue;  // an empty level: its samples read zero
        }
        for (int64_t p = 0; p < sizes.num_points; ++p) {
          const int64_t sample = l * sizes.num_points + p;
          if (!bilinear_corners(locations[2 * sample], locations[2 * sample + 1], height, width, level_start, corners)) {
            continue;
          }
          // Bilinear and attention weight folded once per sample, not once per channel. Outside
          // corners read a clamped row with weight 0 (no branch: skipping them made the forward
          // slower in a quick measurement). That row is always another corner of the same sample,
          // read with a positive weight, so an inf or nan stored there makes grid_sample's result
          // non-finite too: the branch-free read can turn inf into nan (0 * inf), never a finite
          // result into nan.
          const scalar_t attention = weights[sample];
          accumulate_sample(
              out, value_head + corners.row[0] * row_stride, value_head + corners.row[1] * row_stride,
              value_head + corners.row[2] * row_stride, value_head + corners.row[3] * row_stride,
              attention * corners.weight[0], attention * corners.weight[1], attention * corners.weight[2],
              attention * corners.weight[3], sizes.head_dim);
        }
      }
    }
  }
}

// Backward of one sample whose four corners are inside the map (four distinct rows): returns
// dot[c] = <grad_out, row_c> and adds weight_c * grad_out to grad_row_c, in one pass over D.
template <typename scalar_t>
inline void backward_interior_sample(
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ row0,
    const scalar_t* __restrict__ row1,
    const scalar_t* __restrict__ row2,
    const scalar_t* __restrict__ row3,
    scalar_t* __restrict__ grad_row0,
    scalar_t* __restrict__ grad_row1,
    scalar_t* __restrict__ grad_row2,
    scalar_t* __restrict__ grad_row3,
    scalar_t w0,
    scalar_t w1,
    scalar_t w2,
    scalar_t w3,
    int64_t head_dim,
    scalar_t* dot) {
  scalar_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
  for (int64_t d = 0; d < head_dim; ++d) {
    const scalar_t grad = grad_out[d];
    dot0 += grad * row0[d];
    dot1 += grad * row1[d];
    dot2 += grad * row2[d];
    dot3 += grad * row3[d];
    grad_row0[d] += w0 * grad;
    grad_row1[d] += w1 * grad;
    grad_row2[d] += w2 * grad;
    grad_row3[d] += w3 * grad;
  }
  dot[0] = dot0;
  dot[1] = dot1;
  dot[2] = dot2;
  dot[3] = dot3;
}

// Backward of one corner inside the map when others are not: returns <grad_out, row> and adds
// weight * grad_out to grad_row.
template <typename scalar_t>
inline scalar_t backward_border_corner(
    const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ row,
    scalar_t* __restrict__ grad_row,
    scalar_t weight,
    int64_t head_dim) {
  scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < head_dim; ++d) {
    dot += grad_out[d] * row[d];
    grad_row[d] += weight * grad_out[d];
  }
  return dot;
}

// Backward of one sample with at least one corner inside the map: writes the gradients of its
// location (2,) and attention weight, and adds its share to the grad_value rows of its corners.
template <typename scalar_t>
inline void backward_sample(
    const scalar_t* value_head,
    const scalar_t* grad_out,
    const BilinearCorners<scalar_t>& corners,
    scalar_t attention,
    int64_t height,
    int64_t width,
    int64_t row_stride,
    int64_t head_dim,
    scalar_t* grad_value_head,
    scalar_t* grad_location,
    scalar_t* grad_attention_weight) {
  const scalar_t* row0 = value_head + corners.row[0] * row_stride;
  const scalar_t* row1 = value_head + corners.row[1] * row_stride;
  const scalar_t* row2 = value_head + corners.row[2] * row_stride;
  const scalar_t* row3 = value_head + corners.row[3] * row_stride;
  scalar_t* grad_row0 = grad_value_head + corners.row[0] * row_stride;
  scalar_t* grad_row1 = grad_value_head + corners.row[1] * row_stride;
  scalar_t* grad_row2 = grad_value_head + corners.row[2] * row_stride;
  scalar_t* grad_row3 = grad_value_head + corners.row[3] * row_stride;
  const scalar_t w0 = attention * corners.weight[0];
  const scalar_t w1 = attention * corners.weight[1];
  const scalar_t w2 = attention * corners.weight[2];
  const scalar_t w3 = attention * corners.weight[3];
  // dot[c] = <grad_out, corner_row_c>, needed for both the location and the weight gradients;
  // d output / d value is scattered (weight * grad_out) into the four rows this unit owns.
  scalar_t dot[4];
  if (corners.inside[0] && corners.inside[1] && corners.inside[2] && corners.inside[3]) {
    // The common case: four distinct rows, one fused pass over the channels.
    backward_interior_sample(
        grad_out, row0, row1, row2, row3, grad_row0, grad_row1, grad_row2, grad_row3, w0, w1, w2, w3,
        head_dim, dot);
  } else {
    // On a border, clamped corners share rows: skip them (zero padding: value 0, no gradient).
    const scalar_t* rows[4] = {row0, row1, row2, row3};
    scalar_t* grad_rows[4] = {grad_row0, grad_row1, grad_row2, grad_row3};
    const scalar_t weights[4] = {w0, w1, w2, w3};
    for (int corner = 0; corner < 4; ++corner) {
      dot[corner] = corners.inside[corner]
          ? backward_border_corner(grad_out, rows[corner], grad_rows[corner], weights[corner], head_dim)
          : scalar_t(0);
    }
  }

  // d output / d attention = the bilinear sample.
  *grad_attention_weight = corners.weight[0] * dot[0] + corners.weight[1] * dot[1] +
      corners.weight[2] * dot[2] + corners.weight[3] * dot[3];
  // d sample / d px = (1 - fy) (v1 - v0) + fy (v3 - v2), and px = x * W - 0.5 (likewise y).
  const scalar_t fx = corners.frac_x;
  const scalar_t fy = corners.frac_y;
  grad_location[0] =
      attention * static_cast<scalar_t>(width) * ((1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]));
  grad_location[1] =
      attention * static_cast<scalar_t>(height) * ((1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]));
}

// Backward of the work units [begin, end): unit u is head m of batch n for the levels
// [first_level, first_level + levels_per_unit), with levels_per_unit dividing L (see the caller).
template <typename scalar_t>
DF_CPU_CLONES void backward_units(
    const scalar_t* value,
    const int64_t* spatial_shapes,
    const int64_t* level_start_index,
    const scalar_t* sampling_locations,
    const scalar_t* attention_weights,
    const scalar_t* grad_output,
    scalar_t* grad_value,
    scalar_t* grad_sampling_locations,
    scalar_t* grad_attention_weights,
    const uint8_t* level_readable,
    const Sizes& sizes,
    int64_t levels_per_unit,
    int64_t begin,
    int64_t end) {
  const int64_t row_stride = sizes.num_heads * sizes.head_dim;
  const int64_t head_dim = sizes.head_dim;
  const int64_t units_per_head = sizes.num_levels / levels_per_unit;
  BilinearCorners<scalar_t> corners;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t first_level = (unit % units_per_head) * levels_per_unit;
    const int64_t m = (unit / units_per_head) % sizes.num_heads;
    const int64_t n = unit / (units_per_head * sizes.num_heads);
    const int64_t head_offset = (n * sizes.num_rows * sizes.num_heads + m) * head_dim;
    const scalar_t* value_head = value + head_offset;
    scalar_t* grad_value_head = grad_value + head_offset;
    for (int64_t q = 0; q < sizes.num_queries; ++q) {
      const int64_t head_index = (n * sizes.num_queries + q) * sizes.num_heads + m;  // into (N, Lq, M)
      const scalar_t* grad_out = grad_output + head_index * head_dim;
      for (int64_t l = first_level; l < first_level + levels_per_unit; ++l) {
        const int64_t height = spatial_shapes[2 * l];
        const int64_t width = spatial_shapes[2 * l + 1];
        const int64_t level_start = level_start_index[l];
        if (!level_readable[l]) {
          continue;  // an empty level: its samples read zero, all their gradients stay zero
        }
        const int64_t first_sample = (head_index * sizes.num_levels + l) * sizes.num_points;  // into (N, Lq, M, L, P)
        for (int64_t p = 0; p < sizes.num_points; ++p) {
          const int64_t sample = first_sample + p;
          if (!bilinear_corners(
                  sampling_locations[2 * sample], sampling_locations[2 * sample + 1], height, width, level_start,
                  corners)) {
            continue;  // no corner inside: all three gradients stay zero
          }
          backward_sample(
              value_head, grad_out, corners, attention_weights[sample], height, width, row_stride, head_dim,
              grad_value_head, grad_sampling_locations + 2 * sample, grad_attention_weights + sample);
        }
      }
    }
  }
}

// level_is_readable of every level, computed once per call (not once per query and head).
std::vector<uint8_t> readable_levels(const int64_t* spatial_shapes, const int64_t* level_start_index, const Sizes& sizes) {
  std::vector<uint8_t> readable(sizes.num_levels);
  for (int64_t l = 0; l < sizes.num_levels; ++l) {
    readable[l] = level_is_readable(spatial_shapes[2 * l], spatial_shapes[2 * l + 1], level_start_index[l], sizes.num_rows);
  }
  return readable;
}

// float16 and bfloat16 run the float32 kernel on converted copies (float32 accumulation); their
// locations and weights may already be float32 (then .to() returns them as they are).
bool is_reduced_precision(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kHalf || tensor.scalar_type() == at::kBFloat16;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, {});
  if (is_reduced_precision(value)) {
    return ms_deform_attn_forward_cpu(
               value.to(at::kFloat), spatial_shapes, level_start_index, sampling_locations.to(at::kFloat),
               attention_weights.to(at::kFloat))
        .to(value.scalar_type());
  }
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
  // A block of queries per task keeps the scheduling cost small against ~M * L * P samples per query.
  const int64_t samples_per_query = std::max<int64_t>(1, sizes.num_heads * sizes.num_levels * sizes.num_points);
  const int64_t grain = std::max<int64_t>(1, 4096 / samples_per_query);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* value_data = value_c.data_ptr<scalar_t>();
    const int64_t* shapes_data = shapes_c.data_ptr<int64_t>();
    const int64_t* starts_data = starts_c.data_ptr<int64_t>();
    const std::vector<uint8_t> readable = readable_levels(shapes_data, starts_data, sizes);
    const scalar_t* locations_data = locations_c.data_ptr<scalar_t>();
    const scalar_t* weights_data = weights_c.data_ptr<scalar_t>();
    scalar_t* output_data = output.data_ptr<scalar_t>();
    at::parallel_for(0, sizes.batch * sizes.num_queries, grain, [&](int64_t begin, int64_t end) {
      forward_queries<scalar_t>(
          value_data, shapes_data, starts_data, locations_data, weights_data, readable.data(), output_data, sizes,
          begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(grad_output.defined(), "ms_deform_attn_backward: grad_output is undefined");
  check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output);
  if (is_reduced_precision(value)) {
    auto grads = ms_deform_attn_backward_cpu(
        value.to(at::kFloat), spatial_shapes, level_start_index, sampling_locations.to(at::kFloat),
        attention_weights.to(at::kFloat), grad_output.to(at::kFloat));
    // Each gradient in the dtype of its input (a float32 location gets a float32 gradient).
    return {
        std::get<0>(grads).to(value.scalar_type()), std::get<1>(grads).to(sampling_locations.scalar_type()),
        std::get<2>(grads).to(attention_weights.scalar_type())};
  }
  at::Tensor grad_value = at::zeros(value.sizes(), value.options());
  at::Tensor grad_sampling_locations = at::zeros(sampling_locations.sizes(), value.options());
  at::Tensor grad_attention_weights = at::zeros(attention_weights.sizes(), value.options());
  const Sizes sizes = sizes_of(value, sampling_locations);
  if (grad_attention_weights.numel() == 0 || value.numel() == 0) {
    return {grad_value, grad_sampling_locations, grad_attention_weights};
  }
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const scalar_t* value_data = value_c.data_ptr<scalar_t>();
    const int64_t* shapes_data = shapes_c.data_ptr<int64_t>();
    const int64_t* starts_data = starts_c.data_ptr<int64_t>();
    const std::vector<uint8_t> readable = readable_levels(shapes_data, starts_data, sizes);
    const scalar_t* locations_data = locations_c.data_ptr<scalar_t>();
    const scalar_t* weights_data = weights_c.data_ptr<scalar_t>();
    const scalar_t* grad_output_data = grad_output_c.data_ptr<scalar_t>();
    scalar_t* grad_value_data = grad_value.data_ptr<scalar_t>();
    scalar_t* grad_locations_data = grad_sampling_locations.data_ptr<scalar_t>();
    scalar_t* grad_weights_data = grad_attention_weights.data_ptr<scalar_t>();
    // Each unit owns its grad_value rows (see the top of the file). All levels of a head in one unit
    // read each grad_output row once; one level per unit gives L times more units for many threads.
    // Every grad_value row receives its updates in the same order either way (queries, then points),
    // so the result does not depend on this choice or on the number of threads.
    const int64_t num_heads_total = sizes.batch * sizes.num_heads;
    const int64_t levels_per_unit = num_heads_total >= 2 * at::get_num_threads() ? sizes.num_levels : 1;
    const int64_t num_units = num_heads_total * (sizes.num_levels / levels_per_unit);
    at::parallel_for(0, num_units, 1, [&](int64_t begin, int64_t end) {
      backward_units<scalar_t>(
          value_data, shapes_data, starts_data, locations_data, weights_data, grad_output_data, grad_value_data,
          grad_locations_data, grad_weights_data, readable.data(), sizes, levels_per_unit, begin, end);
    });
  });
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace deformable_family
