"""Adaptive 3D feature sampling of AdaMixer / StageInteractor on the family's deformable-sampling op.

A sampling point has a position (x, y) in input pixels and a scale z (log2 units). Its feature is
the sum over the L pyramid levels of the bilinear sample at (x, y) of level l, weighted by
softmax_l(-(z - c_l)^2 / tau) with tau = 2 (AdaMixer Eq. 3-4; c_l = log2(stride_l), plus 1 in
StageInteractor). Group g of the points reads channels [g C/G, (g + 1) C/G) of every level.

The op computes exactly this when each point is its own query (points folded into the query axis)
with one sampling point per level and the level weights as attention weights:
``ms_deform_attn(value (B, S, G, C/G), ..., locations (B, N*P, G, L, 1, 2), weights (B, N*P, G, L, 1))``
instead of one ``grid_sample`` per level.
"""
import math
from typing import NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

from deformable_family.layers import ms_deform_attn

__all__ = [
    "FeatureLevels",
    "flatten_levels",
    "level_weights",
    "sample_3d",
    "AdaptiveSampler3D",
    "CoarseFineSampler",
]

# Temperature of the level weights: softmax over levels of -(z - c_l)^2 / 2 (AdaMixer Eq. 4).
_LEVEL_TAU = 2.0


class FeatureLevels(NamedTuple):
    """The multi-scale feature maps in the op's layout, built once per batch and read by every
    stage.

    value: (B, S, G, C / G), S = sum of H_l * W_l, levels flattened row-major in level order.
    spatial_shapes: (L, 2) int64 (H_l, W_l).
    level_start_index: (L,) int64.
    extents: (L, 2) float (W_l * stride_l, H_l * stride_l): the pixel extent of each map, which
        normalises the sampling positions (AdaMixer divides by the map size times the stride, i.e.
        the padded input size).
    log2_strides: (L,) float.
    """

    value: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    extents: Tensor
    log2_strides: Tensor


def flatten_levels(
    features: Sequence[Tensor], strides: Sequence[int], num_groups: int
) -> FeatureLevels:
    """
    Args:
        features: L maps (B, C, H_l, W_l), C divisible by ``num_groups``.
        strides: L strides in input pixels.
        num_groups: G, the channel groups read by the point groups.

    Returns:
        :class:`FeatureLevels` on the features' device.
    """
    if len(features) != len(strides):
        raise ValueError(f"got {len(features)} feature maps but {len(strides)} strides")
    batch, channels = features[0].shape[:2]
    if channels % num_groups != 0:
        raise ValueError(
            f"feature channels ({channels}) must be divisible by num_groups ({num_groups})"
        )
    device = features[0].device
    shapes = [tuple(feature.shape[-2:]) for feature in features]
    value = torch.cat([feature.flatten(2) for feature in features], dim=2)  # (B, C, S)
    value = value.transpose(1, 2).reshape(batch, -1, num_groups, channels // num_groups)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.int64, device=device)
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    level_start_index = torch.as_tensor(starts, dtype=torch.int64, device=device)
    extents = torch.as_tensor(
        [[width * stride, height * stride] for (height, width), stride in zip(shapes, strides)],
        dtype=value.dtype,
        device=device,
    )
    log2_strides = torch.as_tensor(
        [math.log2(stride) for stride in strides], dtype=value.dtype, device=device
    )
    return FeatureLevels(
        value.contiguous(), spatial_shapes, level_start_index, extents, log2_strides
    )


def level_weights(z: Tensor, level_centres: Tensor, tau: float = _LEVEL_TAU) -> Tensor:
    """softmax over levels of -(z - c_l)^2 / tau (AdaMixer Eq. 4).

    Args:
        z: (...) scale of each point (log2 pixels).
        level_centres: (L,) c_l.

    Returns:
        (..., L) weights summing to one.
    """
    return torch.softmax(-(z[..., None] - level_centres).pow(2) / tau, dim=-1)


def sample_3d(
    features: FeatureLevels, points_xy: Tensor, points_z: Tensor, level_centre_offset: float = 0.0
) -> Tensor:
    """Sample every point on every level and mix the levels by scale.

    Args:
        features: the maps, see :class:`FeatureLevels` (G groups of C / G channels).
        points_xy: (B, N, G, P, 2) positions in input pixels.
        points_z: (B, N, G, P) scales, log2 pixels.
        level_centre_offset: added to log2(stride_l) to give the level centres c_l (0 in AdaMixer,
            1 in StageInteractor).

    Returns:
        (B, N, G, P, C / G): sum_l w_l(z) * bilinear(level l, (x, y)), zero outside the maps
        (``grid_sample`` with ``align_corners=False`` and zero padding, as the authors).
    """
    batch, num_queries, num_groups, num_points, _ = points_xy.shape
    if features.value.shape[2] != num_groups:
        raise ValueError(
            f"points have {num_groups} groups but the feature value has {features.value.shape[2]}"
        )
    weights = level_weights(
        points_z, features.log2_strides + level_centre_offset
    )  # (B, N, G, P, L)
    locations = points_xy[..., None, :] / features.extents  # (B, N, G, P, L, 2)
    # (B, N, G, P, ...) -> (B, N * P, G, ...): each point is a query of the op, with 1 point per level.
    locations = locations.permute(0, 1, 3, 2, 4, 5).reshape(
        batch, num_queries * num_points, num_groups, -1, 1, 2
    )
    weights = weights.permute(0, 1, 3, 2, 4).reshape(
        batch, num_queries * num_points, num_groups, -1, 1
    )
    value = features.value
    sampled = ms_deform_attn(
        value,
        features.spatial_shapes,
        features.level_start_index,
        locations.to(value.dtype),
        weights.to(value.dtype),
    )  # (B, N * P, G * C / G)
    sampled = sampled.view(batch, num_queries, num_points, num_groups, -1)
    return sampled.permute(0, 1, 3, 2, 4)


class AdaptiveSampler3D(nn.Module):
    """AdaMixer's sampling points (Sec. 3.2): P points per group from one linear layer of the
    content vector, offsets in units of the box size and a scale offset.

        (dx, dy, dz) = Linear(q)[g, p],  x = cx + dx * w,  y = cy + dy * h,  z_p = z + dz
    """

    level_centre_offset = 0.0

    def __init__(self, d_model: int = 256, num_groups: int = 4, num_points: int = 32):
        """
        Args:
            d_model: width of the content vector.
            num_groups: G point groups (each reads C / G channels).
            num_points: P points per group.
        """
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_groups", num_groups),
            ("num_points", num_points),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdaptiveSampler3D: {name} must be a positive int, got {value!r}")
        self.num_groups = num_groups
        self.num_points = num_points
        # Output layout (g * P + p) * 3 + {dx, dy, dz}, as the authors' checkpoints.
        self.offsets = nn.Linear(d_model, num_groups * num_points * 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero weight, so the first points depend only on the bias: x, y offsets U(-0.5, 0.5) (or a
        regular grid when P is a square number, as the authors), dz = -1 (each point starts on the
        level whose stride is about half the box size)."""
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)
        bias = self.offsets.bias.view(self.num_groups, self.num_points, 3)
        side = int(self.num_points ** 0.5)
        if side * side == self.num_points:
            centres = torch.linspace(-0.5, 0.5, side + 1)[:-1] + 0.5 / side
            # The authors write the row coordinate into dx and the column into dy: the same grid.
            bias[:, :, 0] = centres.view(-1, 1).repeat(1, side).flatten()
            bias[:, :, 1] = centres.view(1, -1).repeat(side, 1).flatten()
        else:
            nn.init.uniform_(bias[:, :, 0:2], -0.5, 0.5)
        nn.init.constant_(bias[:, :, 2], -1.0)

    def forward(self, query: Tensor, xyzr: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, N, d_model) content vectors.
            xyzr: (B, N, 4) query boxes.

        Returns:
            points_xy (B, N, G, P, 2) in pixels and points_z (B, N, G, P).
        """
        batch, num_queries = query.shape[:2]
        offsets = self.offsets(query).view(batch, num_queries, self.num_groups, self.num_points, 3)
        z, r = xyzr[..., 2:3], xyzr[..., 3:4]
        wh = 2.0 ** torch.cat([z - 0.5 * r, z + 0.5 * r], dim=-1)  # (B, N, 2)
        points_xy = xyzr[:, :, None, None, 0:2] + offsets[..., 0:2] * wh[:, :, None, None, :]
        points_z = xyzr[:, :, None, None, 2] + offsets[..., 2]
        return points_xy, points_z


class CoarseFineSampler(nn.Module):
    """StageInteractor's sampler (supplementary Sec. B, as in the authors' code): Pc coarse points
    per group and K fine offsets shared by all groups and coarse points, P = Pc * K points per group
    in the order p * K + k:

        x = cx + w * (dx0[g, p] + 2^dz0[g, p] * dx1[k]),   y likewise with h,
        z = z_q + dz0[g, p] + dz1[k]

    (The supplementary's pseudo-code has fine offsets per group and 2^(z - r/2) on both axes; the
    released code, followed here, shares them and scales x by w and y by h.)
    """

    level_centre_offset = 1.0

    def __init__(
        self, d_model: int = 256, num_groups: int = 4, coarse_points: int = 4, fine_points: int = 8
    ):
        """
        Args:
            d_model: width of the content vector.
            num_groups: G point groups.
            coarse_points: Pc coarse points per group.
            fine_points: K fine offsets around each coarse point.
        """
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_groups", num_groups),
            ("coarse_points", coarse_points),
            ("fine_points", fine_points),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CoarseFineSampler: {name} must be a positive int, got {value!r}")
        self.num_groups = num_groups
        self.coarse_points = coarse_points
        self.fine_points = fine_points
        self.num_points = coarse_points * fine_points
        # Layouts (g * Pc + p) * 3 + c and k * 3 + c, as the authors' checkpoints.
        self.coarse_offsets = nn.Linear(d_model, 3 * num_groups * coarse_points)
        self.fine_offsets = nn.Linear(d_model, 3 * fine_points)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero weights; coarse x, y bias U(-0.5, 0.5); fine x, y bias U(+-0.5 / sqrt 2) except the
        first fine offset (0, the coarse point itself); every z bias 0 (supplementary Sec. J)."""
        nn.init.zeros_(self.coarse_offsets.weight)
        nn.init.zeros_(self.coarse_offsets.bias)
        nn.init.uniform_(self.coarse_offsets.bias.view(-1, 3)[:, 0:2], -0.5, 0.5)
        nn.init.zeros_(self.fine_offsets.weight)
        nn.init.zeros_(self.fine_offsets.bias)
        bound = 0.5 / math.sqrt(2.0)
        nn.init.uniform_(self.fine_offsets.bias.view(-1, 3)[1:, 0:2], -bound, bound)

    def forward(self, query: Tensor, xyzr: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query: (B, N, d_model) content vectors.
            xyzr: (B, N, 4) query boxes.

        Returns:
            points_xy (B, N, G, Pc * K, 2) in pixels and points_z (B, N, G, Pc * K).
        """
        batch, num_queries = query.shape[:2]
        coarse = self.coarse_offsets(query).view(
            batch, num_queries, self.num_groups, self.coarse_points, 1, 3
        )
        fine = self.fine_offsets(query).view(batch, num_queries, 1, 1, self.fine_points, 3)
        z, r = xyzr[..., 2:3], xyzr[..., 3:4]
        wh = 2.0 ** torch.cat([z - 0.5 * r, z + 0.5 * r], dim=-1)
        offset_xy = (
            coarse[..., 0:2] + 2.0 ** coarse[..., 2:3] * fine[..., 0:2]
        )  # (B, N, G, Pc, K, 2)
        points_xy = xyzr[:, :, None, None, None, 0:2] + wh[:, :, None, None, None, :] * offset_xy
        points_z = xyzr[:, :, None, None, None, 2] + coarse[..., 2] + fine[..., 2]
        shape = (batch, num_queries, self.num_groups, self.num_points)
        return points_xy.reshape(*shape, 2), points_z.reshape(shape)
