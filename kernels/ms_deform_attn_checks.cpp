// Input validation shared by the CPU and CUDA entry points: every kernel indexes value rows with
// spatial_shapes and level_start_index, so these are checked before any kernel runs.
#include <c10/util/Exception.h>

#include <ATen/ATen.h>

#include "ms_deform_attn.h"

namespace deformable_family {

namespace {

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Locations and weights have the dtype of value, or float32 with a 16-bit value (then a location
// keeps float32 precision: in bfloat16 a location near 1.0 is quantised to about half a pixel on a
// 134-pixel-wide level).
void check_coordinate_dtype(const at::Tensor& value, const at::Tensor& tensor, const char* name) {
  const at::ScalarType dtype = tensor.scalar_type();
  const bool value_is_16_bit = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(
      dtype == value.scalar_type() || (value_is_16_bit && dtype == at::kFloat), "ms_deform_attn: ", name,
      " has dtype ", dtype, " but value has dtype ", value.scalar_type(), "; it must be ", value.scalar_type(),
      value_is_16_bit ? " or Float (float32)" : "");
}

void check_same_device(const at::Tensor& value, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(
      other.device() == value.device(), "ms_deform_attn: ", name, " is on ", other.device(),
      " but value is on ", value.device(), "; all inputs must be on the same device");
}

}  // namespace

void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  // dtypes first: a wrong dtype is a TypeError whatever the shapes.
  TORCH_CHECK_TYPE(
      is_supported_float(value.scalar_type()), "ms_deform_attn: value must be float32, float64, float16 or "
      "bfloat16, got ", value.scalar_type());
  check_coordinate_dtype(value, sampling_locations, "sampling_locations");
  check_coordinate_dtype(value, attention_weights, "attention_weights");
  TORCH_CHECK_TYPE(
      spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
      spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(
      level_start_index.scalar_type() == at::kLong, "ms_deform_attn: level_start_index must be int64, got ",
      level_start_index.scalar_type());
  if (grad_output.defined()) {
    TORCH_CHECK_TYPE(
        grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output has dtype ",
        grad_output.scalar_type(), " but value has dtype ", value.scalar_type(), "; they must match");
  }

  check_same_device(value, spatial_shapes, "spatial_shapes");
  check_same_device(value, level_start_index, "level_start_index");
  check_same_device(value, sampling_locations, "sampling_locations");
  check_same_device(value, attention_weights, "attention_weights");
  if (grad_output.defined()) {
    check_same_device(value, grad_output, "grad_output");
  }

  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK_VALUE(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      "ms_deform_attn: spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  const int64_t batch = value.size(0);
  const int64_t num_rows = value.size(1);
  const int64_t num_heads = value.size(2);
  const int64_t head_dim = value.size(3);
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(
      level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
      "ms_deform_attn: level_start_index must be (L,) = (", num_levels, ",) as spatial_shapes ",
      spatial_shapes.sizes(), ", got shape ", level_start_index.sizes());
  TORCH_CHECK_VALUE(
      sampling_locations.dim() == 6, "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
      sampling_locations.sizes());
  const int64_t num_queries = sampling_locations.size(1);
  const int64_t num_points = sampling_locations.size(4);
  TORCH_CHECK_VALUE(
      sampling_locations.size(0) == batch && sampling_locations.size(2) == num_heads &&
          sampling_locations.size(3) == num_levels && sampling_locations.size(5) == 2,
      "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) with N=", batch, ", M=", num_heads,
      " (from value ", value.sizes(), ") and L=", num_levels, " (from spatial_shapes ", spatial_shapes.sizes(),
      "), got shape ", sampling_locations.sizes());
  TORCH_CHECK_VALUE(
      attention_weights.dim() == 5 && attention_weights.size(0) == batch && attention_weights.size(1) == num_queries &&
          attention_weights.size(2) == num_heads && attention_weights.size(3) == num_levels &&
          attention_weights.size(4) == num_points,
      "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = (", batch, ", ", num_queries, ", ", num_heads,
      ", ", num_levels, ", ", num_points, ") to match sampling_locations ", sampling_locations.sizes(),
      ", got shape ", attention_weights.sizes());
  if (grad_output.defined()) {
    TORCH_CHECK_VALUE(
        grad_output.dim() == 3 && grad_output.size(0) == batch && grad_output.size(1) == num_queries &&
            grad_output.size(2) == num_heads * head_dim,
        "ms_deform_attn: grad_output must be (N, Lq, M * D) = (", batch, ", ", num_queries, ", ",
        num_heads * head_dim, "), got shape ", grad_output.sizes());
  }

  // Values of the level description: read only where they are in host memory. Copying CUDA tensors
  // to the host here would synchronise on every call and cannot be captured in a CUDA graph; there
  // Python's ms_deform_attn checks host values, and the kernels skip any level whose rows are not
  // inside value (level_is_readable), so no value read depends on this check.
  if (!spatial_shapes.is_cpu()) {
    return;
  }
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* shapes_data = shapes.data_ptr<int64_t>();
  const int64_t* starts_data = starts.data_ptr<int64_t>();
  int64_t expected_start = 0;
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t height = shapes_data[2 * level];
    const int64_t width = shapes_data[2 * level + 1];
    TORCH_CHECK_VALUE(
        height >= 0 && width >= 0, "ms_deform_attn: spatial_shapes[", level, "] = (", height, ", ", width,
        ") must not be negative");
    const int64_t start = starts_data[level];
    TORCH_CHECK_VALUE(
        start == expected_start, "ms_deform_attn: level_start_index[", level, "] = ", start,
        " is inconsistent with spatial_shapes: expected ", expected_start,
        " (the sum of H*W over the earlier levels)");
    // Checked before the product, which could overflow for absurd sizes.
    TORCH_CHECK_VALUE(
        height == 0 || width <= (num_rows - expected_start) / height,
        "ms_deform_attn: spatial_shapes describe more rows than value has: level ", level, " = (", height, ", ",
        width, ") ends past S = ", num_rows, " (value shape ", value.sizes(), ")");
    expected_start += height * width;
  }
  TORCH_CHECK_VALUE(
      expected_start == num_rows, "ms_deform_attn: spatial_shapes describe sum(H*W) = ", expected_start,
      " rows but value has S = ", num_rows, " (value shape ", value.sizes(), ")");
}

}  // namespace deformable_family
