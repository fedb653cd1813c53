"""The Triton kernels of multi-scale deformable sampling (forward and backward); the launch code,
the autograd and the documentation of the layout are in :mod:`.ms_deform_attn_triton`.

Imported on the first use of the Triton path, not with the package: it imports triton, and
``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels below are defined, i.e. at that import.
"""

import triton
import triton.language as tl


@triton.jit
def _bilinear_setup(x, y, height, width, valid):
    """Pixel coordinates and bilinear weights of samples at normalised (x, y) on an (H, W) map.

    x, y: (BLOCK_Q, 1) float32; valid: (BLOCK_Q, 1) bool (query inside the tensor). Returns the row
    and column of the top-left corner (int64), the fractional parts (ly, lx), and whether the
    sample touches the map and which corners lie inside it."""
    height_f = height.to(tl.float32)
    width_f = width.to(tl.float32)
    # Pixel centres at (i + 0.5) / W: grid_sample's unnormalisation for align_corners=False.
    h_im = y * height_f - 0.5
    w_im = x * width_f - 0.5
    # False for nan, +-inf and for an empty level (H or W = 0), so those samples read nothing.
    inside = valid & (h_im > -1.0) & (w_im > -1.0) & (h_im < height_f) & (w_im < width_f)
    # Keep floor and the integer conversion finite where the sample is dropped anyway.
    h_im = tl.where(inside, h_im, 0.0)
    w_im = tl.where(inside, w_im, 0.0)
    h_low_f = tl.floor(h_im)
    w_low_f = tl.floor(w_im)
    ly = h_im - h_low_f
    lx = w_im - w_low_f
    h_low = h_low_f.to(tl.int64)
    w_low = w_low_f.to(tl.int64)
    top = inside & (h_low >= 0)
    bottom = inside & (h_low + 1 < height)
    left = w_low >= 0
    right = w_low + 1 < width
    return h_low, w_low, ly, lx, inside, top & left, top & right, bottom & left, bottom & right


@triton.jit
def _corner_rows(start, h_low, w_low, width, num_rows, tl_in, tr_in, bl_in, br_in):
    """Rows in S of the four corners (top-left, top-right, bottom-left, bottom-right) and their
    masks. The masks also require 0 <= row < S, so inconsistent level tensors cannot make a
    kernel read or write outside value."""
    row_tl = start + h_low * width + w_low
    row_tr = row_tl + 1
    row_bl = row_tl + width
    row_br = row_bl + 1
    tl_in = tl_in & (row_tl >= 0) & (row_tl < num_rows)
    tr_in = tr_in & (row_tr >= 0) & (row_tr < num_rows)
    bl_in = bl_in & (row_bl >= 0) & (row_bl < num_rows)
    br_in = br_in & (row_br >= 0) & (row_br < num_rows)
    return row_tl, row_tr, row_bl, row_br, tl_in, tr_in, bl_in, br_in


@triton.jit
def ms_deform_attn_forward_kernel(
    value_ptr,  # (N, S, M, D)
    spatial_shapes_ptr,  # (L, 2) int64
    level_start_index_ptr,  # (L,) int64
    locations_ptr,  # (N, Lq, M, L, P, 2)
    weights_ptr,  # (N, Lq, M, L, P)
    output_ptr,  # (N, Lq, M, D)
    num_rows,
    num_queries,
    num_heads,
    num_levels,
    num_points,
    head_dim,
    num_query_blocks,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    query_block = pid % num_query_blocks
    batch_head = (pid // num_query_blocks).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    # Per-query values are (BLOCK_Q, 1) columns of the (BLOCK_Q, BLOCK_D) tile's layout, so they
    # broadcast over the channels without a layout conversion.
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
    channels = tl.arange(0, BLOCK_D)[None, :]
    query_mask = queries < num_queries
    channel_mask = channels < head_dim
    # value[n, s, m, :] starts at ((n * S + s) * M + m) * D.
    value_head = value_ptr + (batch * num_rows * num_heads + head) * head_dim + channels
    row_stride = num_heads * head_dim
    # (n, q, m) flattened: the output row, and the first of the L * P samples of the query and head.
    query_head = (batch * num_queries + queries) * num_heads + head
    samples = num_levels * num_points
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(num_levels):
        height = tl.load(spatial_shapes_ptr + 2 * level)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1)
        start = tl.load(level_start_index_ptr + level)
        for point in range(num_points):
            sample = query_head * samples + level * num_points + point
            x = tl.load(locations_ptr + 2 * sample, mask=query_mask, other=0.0).to(tl.float32)
            y = tl.load(locations_ptr + 2 * sample + 1, mask=query_mask, other=0.0).to(tl.float32)
            weight = tl.load(weights_ptr + sample, mask=query_mask, other=0.0).to(tl.float32)
            h_low, w_low, ly, lx, inside, tl_in, tr_in, bl_in, br_in = _bilinear_setup(
                x, y, height, width, query_mask
            )
            row_tl, row_tr, row_bl, row_br, tl_in, tr_in, bl_in, br_in = _corner_rows(
                start, h_low, w_low, width, num_rows, tl_in, tr_in, bl_in, br_in
            )
            hy = 1.0 - ly
            hx = 1.0 - lx
            v_tl = tl.load(
                value_head + row_tl * row_stride,
                mask=tl_in & channel_mask,
                other=0.0,
            ).to(tl.float32)
            v_tr = tl.load(
                value_head + row_tr * row_stride,
                mask=tr_in & channel_mask,
                other=0.0,
            ).to(tl.float32)
            v_bl = tl.load(
                value_head + row_bl * row_stride,
                mask=bl_in & channel_mask,
                other=0.0,
            ).to(tl.float32)
            v_br = tl.load(
                value_head + row_br * row_stride,
                mask=br_in & channel_mask,
                other=0.0,
            ).to(tl.float32)
            # Bilinear weights of the four corners, times the attention weight: once per sample.
            acc += (weight * hy * hx) * v_tl
            acc += (weight * hy * lx) * v_tr
            acc += (weight * ly * hx) * v_bl
            acc += (weight * ly * lx) * v_br
    output = output_ptr + query_head * head_dim + channels
    tl.store(output, acc.to(output_ptr.dtype.element_ty), mask=query_mask & channel_mask)


@triton.jit
def ms_deform_attn_backward_kernel(
    value_ptr,  # (N, S, M, D)
    spatial_shapes_ptr,  # (L, 2) int64
    level_start_index_ptr,  # (L,) int64
    locations_ptr,  # (N, Lq, M, L, P, 2)
    weights_ptr,  # (N, Lq, M, L, P)
    grad_output_ptr,  # (N, Lq, M, D)
    grad_value_ptr,  # (N, S, M, D) float32, zero-initialised, accumulated atomically
    grad_locations_ptr,  # (N, Lq, M, L, P, 2)
    grad_weights_ptr,  # (N, Lq, M, L, P)
    num_rows,
    num_queries,
    num_heads,
    num_levels,
    num_points,
    head_dim,
    num_query_blocks,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    query_block = pid % num_query_blocks
    batch_head = (pid // num_query_blocks).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    # Per-query values are (BLOCK_Q, 1) columns of the (BLOCK_Q, BLOCK_D) tile's layout, so they
    # broadcast over the channels without a layout conversion.
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
    channels = tl.arange(0, BLOCK_D)[None, :]
    query_mask = queries < num_queries
    channel_mask = channels < head_dim
    head_offset = (batch * num_rows * num_heads + head) * head_dim + channels
    value_head = value_ptr + head_offset
    grad_value_head = grad_value_ptr + head_offset
    row_stride = num_heads * head_dim
    query_head = (batch * num_queries + queries) * num_heads + head
    samples = num_levels * num_points
    grad_output = tl.load(
        grad_output_ptr + query_head * head_dim + channels,
        mask=query_mask & channel_mask,
        other=0.0,
    ).to(tl.float32)
    for level in range(num_levels):
        height = tl.load(spatial_shapes_ptr + 2 * level)
        width = tl.load(spatial_shapes_ptr + 2 * level + 1)
        start = tl.load(level_start_index_ptr + level)
        for point in range(num_points):
            sample = query_head * samples + level * num_points + point
            x = tl.load(locations_ptr + 2 * sample, mask=query_mask, other=0.0).to(tl.float32)
            y = tl.load(locations_ptr + 2 * sample + 1, mask=query_mask, other=0.0).to(tl.float32)
            weight = tl.load(weights_ptr + sample, mask=query_mask, other=0.0).to(tl.float32)
            h_low, w_low, ly, lx, inside, tl_in, tr_in, bl_in, br_in = _bilinear_setup(
                x, y, height, width, query_mask
            )
            row_tl, row_tr, row_bl, row_br, tl_in, tr_in, bl_in, br_in = _corner_rows(
                start, h_low, w_low, width, num_rows, tl_in, tr_in, bl_in, br_in
            )
            hy = 1.0 - ly
            hx = 1.0 - lx
            mask_tl = tl_in & channel_mask
            mask_tr = tr_in & channel_mask
            mask_bl = bl_in & channel_mask
            mask_br = br_in & channel_mask
            v_tl = tl.load(value_head + row_tl * row_stride, mask=mask_tl, other=0.0).to(tl.float32)
            v_tr = tl.load(value_head + row_tr * row_stride, mask=mask_tr, other=0.0).to(tl.float32)
            v_bl = tl.load(value_head + row_bl * row_stride, mask=mask_bl, other=0.0).to(tl.float32)
            v_br = tl.load(value_head + row_br * row_stride, mask=mask_br, other=0.0).to(tl.float32)
            sampled = (hy * hx) * v_tl + (hy * lx) * v_tr + (ly * hx) * v_bl + (ly * lx) * v_br
            # d out / d weight = <grad_output, sampled value>, a reduction over the channel vector.
            grad_weight = tl.sum(grad_output * sampled, axis=1, keep_dims=True)
            grad_sampled = grad_output * weight
            # d sampled / d (w_im, h_im) from the bilinear formula; d w_im / d x = W, d h_im / d y = H.
            grad_w_im = tl.sum(
                grad_sampled * (hy * (v_tr - v_tl) + ly * (v_br - v_bl)), axis=1, keep_dims=True
            )
            grad_h_im = tl.sum(
                grad_sampled * (hx * (v_bl - v_tl) + lx * (v_br - v_tr)), axis=1, keep_dims=True
            )
            # A dropped sample has every corner masked: its gradients are exactly zero.
            grad_x = tl.where(inside, grad_w_im * width.to(tl.float32), 0.0)
            grad_y = tl.where(inside, grad_h_im * height.to(tl.float32), 0.0)
            grad_weight = tl.where(inside, grad_weight, 0.0)
            tl.store(
                grad_weights_ptr + sample,
                grad_weight.to(grad_weights_ptr.dtype.element_ty),
                mask=query_mask,
            )
            location_type = grad_locations_ptr.dtype.element_ty
            tl.store(grad_locations_ptr + 2 * sample, grad_x.to(location_type), mask=query_mask)
            tl.store(grad_locations_ptr + 2 * sample + 1, grad_y.to(location_type), mask=query_mask)
            # d out / d value: scattered to the four corners; other programs add to the same rows.
            tl.atomic_add(
                grad_value_head + row_tl * row_stride,
                (hy * hx) * grad_sampled,
                mask=mask_tl,
                sem="relaxed",  # a sum: no ordering with other memory is needed
            )
            tl.atomic_add(
                grad_value_head + row_tr * row_stride,
                (hy * lx) * grad_sampled,
                mask=mask_tr,
                sem="relaxed",
            )
            tl.atomic_add(
                grad_value_head + row_bl * row_stride,
                (ly * hx) * grad_sampled,
                mask=mask_bl,
                sem="relaxed",
            )
            tl.atomic_add(
                grad_value_head + row_br * row_stride,
                (ly * lx) * grad_sampled,
                mask=mask_br,
                sem="relaxed",
            )
