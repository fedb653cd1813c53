// What the CPU and CUDA kernels share: the sizes of one call, whether a level may be read, and the
// bilinear sampling step (where the four corners of one sampling location are and how much each
// contributes; grid_sample, align_corners=False, zeros).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DF_HOST_DEVICE inline
#endif

namespace deformable_family {

// The sizes of one call (see ms_deform_attn.h): value (N, S, M, D), locations (N, Lq, M, L, P, 2).
struct Sizes {
  int64_t batch;  // N
  int64_t num_rows;  // S
  int64_t num_heads;  // M
  int64_t head_dim;  // D
  int64_t num_queries;  // Lq
  int64_t num_levels;  // L
  int64_t num_points;  // P
};

inline Sizes sizes_of(const at::Tensor& value, const at::Tensor& sampling_locations) {
  return Sizes{
      value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
      sampling_locations.size(3), sampling_locations.size(4)};
}

// Whether the rows [level_start, level_start + height * width) of a level are non-empty and lie inside
// the num_rows rows of value. Every kernel skips a level for which this is false, so its samples read
// zero: the defined result for an empty level (height or width 0), and a guarantee that no read leaves
// value even for level values the entry point could not check (CUDA tensors are not copied to the
// host for validation). Written without any product that could overflow.
DF_HOST_DEVICE bool level_is_readable(int64_t height, int64_t width, int64_t level_start, int64_t num_rows) {
  if (height <= 0 || width <= 0 || level_start < 0 || level_start >= num_rows) {
    return false;
  }
  const int64_t rows_left = num_rows - level_start;
  return height <= rows_left && width <= rows_left / height;  // height * width <= rows_left
}

DF_HOST_DEVICE float floor_of(float v) {
  return floorf(v);
}
DF_HOST_DEVICE double floor_of(double v) {
  return ::floor(v);
}

// Corners are numbered 0 = (y0, x0), 1 = (y0, x1), 2 = (y1, x0), 3 = (y1, x1) with x1 = x0 + 1 and
// y1 = y0 + 1. A corner outside the map has weight 0 and a row clamped into the map, so a caller may
// read all four rows without leaving the level (the CPU forward does, branch-free; the other kernels
// skip those corners). The clamped row is always that of another corner of the same sample, whose
// weight is positive.
// index_t is the integer type of the rows: int64_t, or int32_t where the caller proved they fit.
template <typename acc_t, typename index_t = int64_t>
struct BilinearCorners {
  index_t row[4];  // row of each corner in the value tensor (level start + y * W + x)
  acc_t weight[4];  // bilinear weight, 0 for a corner outside the map
  bool inside[4];  // whether the corner lies inside the map
  acc_t frac_x;  // x - x0 in [0, 1)
  acc_t frac_y;  // y - y0 in [0, 1)
};

// Fills `corners` for the normalised location (x, y) on a level of height x width pixels whose first
// row is level_start. Returns false when no corner can lie inside the map: the level is empty, or the
// continuous pixel coordinate is outside (-1, W) x (-1, H), or not a number. Such a location
// contributes nothing and receives no gradient, exactly as in grid_sample. The caller checks the level
// with level_is_readable first, so every row computed here lies inside value.
template <typename acc_t, typename index_t>
DF_HOST_DEVICE bool bilinear_corners(
    acc_t x, acc_t y, index_t height, index_t width, index_t level_start, BilinearCorners<acc_t, index_t>& corners) {
  if (height <= 0 || width <= 0) {
    return false;  // an empty level: without this, x * 0 - 0.5 = -0.5 would pass the test below
  }
  // Pixel centres sit at (i + 0.5) / W, so the continuous pixel coordinate is x * W - 0.5.
  const acc_t px = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t py = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Tested in floating point before any integer conversion: converting nan, inf or a huge value to
  // an integer is undefined behaviour. Every comparison with nan is false, so nan is "outside".
  if (!(px > static_cast<acc_t>(-1) && py > static_cast<acc_t>(-1) && px < static_cast<acc_t>(width) &&
        py < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x0_float = floor_of(px);
  const acc_t y0_float = floor_of(py);
  // Safe: x0 is in [-1, W - 1] and y0 in [-1, H - 1] after the test above.
  const index_t x0 = static_cast<index_t>(x0_float);
  const index_t y0 = static_cast<index_t>(y0_float);
  const acc_t frac_x = px - x0_float;
  const acc_t frac_y = py - y0_float;
  const acc_t one = static_cast<acc_t>(1);
  const acc_t zero = static_cast<acc_t>(0);

  const bool x0_inside = x0 >= 0;
  const bool x1_inside = x0 + 1 < width;
  const bool y0_inside = y0 >= 0;
  const bool y1_inside = y0 + 1 < height;
  // Clamped coordinates keep every row inside the level; the weight of a clamped corner is 0.
  const index_t xa = x0_inside ? x0 : 0;
  const index_t xb = x1_inside ? x0 + 1 : width - 1;
  const index_t ya = y0_inside ? y0 : 0;
  const index_t yb = y1_inside ? y0 + 1 : height - 1;

  corners.row[0] = level_start + ya * width + xa;
  corners.row[1] = level_start + ya * width + xb;
  corners.row[2] = level_start + yb * width + xa;
  corners.row[3] = level_start + yb * width + xb;
  corners.inside[0] = y0_inside && x0_inside;
  corners.inside[1] = y0_inside && x1_inside;
  corners.inside[2] = y1_inside && x0_inside;
  corners.inside[3] = y1_inside && x1_inside;
  corners.weight[0] = corners.inside[0] ? (one - frac_y) * (one - frac_x) : zero;
  corners.weight[1] = corners.inside[1] ? (one - frac_y) * frac_x : zero;
  corners.weight[2] = corners.inside[2] ? frac_y * (one - frac_x) : zero;
  corners.weight[3] = corners.inside[3] ? frac_y * frac_x : zero;
  corners.frac_x = frac_x;
  corners.frac_y = frac_y;
  return true;
}

}  // namespace deformable_family
