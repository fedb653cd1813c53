"""Adaptive mixing of the sampled features: AdaMixer's and StageInteractor's cascade.

Both mix the P_in sampled points of each group (P_in x C_g, C_g = C / G) with filters generated
from the content vector q: a channel mixing M (C_g x C_g) and a spatial mixing S (P_out x P_in),

    Y = ReLU(LN(X M)),   Z = ReLU(LN(S Y))        (AdaMixer Eq. 5-6)

where LN normalises the whole matrix without affine parameters. The G flattened Z (G * P_out * C_g)
are projected back to d_model; the stage adds the result to q and applies its layer norm.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaptiveMixing", "CascadeMixing", "MixingHistory"]

# The filters (M, S) of earlier StageInteractor stages, oldest first; None for AdaMixer.
MixingHistory = Optional[List[Tuple[Tensor, Tensor]]]


def _matrix_layer_norm(x: Tensor) -> Tensor:
    """Layer norm over the last two dims (the whole points x channels matrix), no affine."""
    return F.layer_norm(x, x.shape[-2:])


class AdaptiveMixing(nn.Module):
    """AdaMixer's adaptive channel and spatial mixing (Sec. 3.3).

    ``filter_generator`` gives, per group, M (entry c_in * C_g + c_out) then S (entry o * P_in + p);
    ``out_proj`` reads Z flattened as g * P_out * C_g + o * C_g + c.
    """

    def __init__(
        self, d_model: int = 256, num_groups: int = 4, in_points: int = 32, out_points: int = 128
    ):
        """
        Args:
            d_model: width of the content vector and of the sampled features (C).
            num_groups: G.
            in_points: P_in sampled points per group.
            out_points: P_out rows of the spatial mixing.
        """
        super().__init__()
        if d_model % num_groups != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.group_channels = d_model // num_groups
        self.in_points = in_points
        self.out_points = out_points
        self.m_size = self.group_channels * self.group_channels
        self.s_size = out_points * in_points
        self.filter_generator = nn.Linear(d_model, num_groups * (self.m_size + self.s_size))
        self.out_proj = nn.Linear(num_groups * out_points * self.group_channels, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Generator weight 0 (the first filters are its bias, PyTorch's default U(+-1/sqrt(d))),
        output projection xavier_uniform with the default bias, as the authors."""
        self.filter_generator.reset_parameters()
        nn.init.zeros_(self.filter_generator.weight)
        self.out_proj.reset_parameters()
        nn.init.xavier_uniform_(self.out_proj.weight)

    def forward(
        self, sampled: Tensor, query: Tensor, history: MixingHistory = None
    ) -> Tuple[Tensor, MixingHistory]:
        """
        Args:
            sampled: (B, N, G, P_in, C_g) sampled features X.
            query: (B, N, d_model) content vectors q.
            history: unused (AdaMixer has no cross-stage filters); returned as given.

        Returns:
            (B, N, d_model) projection of the mixed features, and ``history``.
        """
        batch, num_queries = query.shape[:2]
        params = self.filter_generator(query).view(batch, num_queries, self.num_groups, -1)
        channel_filter, spatial_filter = params.split([self.m_size, self.s_size], dim=-1)
        channel_filter = channel_filter.view(
            batch, num_queries, self.num_groups, self.group_channels, -1
        )
        spatial_filter = spatial_filter.view(
            batch, num_queries, self.num_groups, self.out_points, self.in_points
        )
        mixed = F.relu(_matrix_layer_norm(torch.matmul(sampled, channel_filter)))
        mixed = F.relu(_matrix_layer_norm(torch.matmul(spatial_filter, mixed)))
        return self.out_proj(mixed.reshape(batch, num_queries, -1)), history


class CascadeMixing(nn.Module):
    """StageInteractor's cascade dynamic mixing (Teng et al. ICCV 2023, Sec. 3.3 and supplementary
    Sec. A), as in the authors' code (``CascadeDynamicMixing`` with their R50 settings).

    Per group, X (Pc * K x C_g) sampled at Pc coarse points x K fine offsets:

    - own filters from q: M_s (C_g x C_g), S_s (R_s x Pc * K); biases b_M (C_g), b_S (P_out);
      F = ReLU(LN(X M_s + b_M)).
    - reuse (``num_reused`` = n > 0): for each of the last n earlier stages j, oldest first,
      F' = U_j(F) + V_j(F) + R (static adapters: U_j mixes the K x C_g block of each coarse point,
      V_j the Pc x C_g block of each fine index; R = X, then the previous F'), the gated filter
      M = (M_j a + M_s (1 - a)) b + M_s (1 - b) with a per input channel and b per output channel
      (sigmoids of linear maps of q), and F = ReLU(LN(F' M + c_j)).
    - spatial reuse (``reuse_spatial``): S' = the first R_s rows and Pc coarse points of the
      previous stage's S, gated per output row u and per input point v like M;
      S = [S_s; S'] has P_out rows.
    - out = ReLU(LN(S F + b_S)), flattened and projected by ``out_proj`` (zero weight at init).

    The stage returns its own M_s and full S to later stages through the history list.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_groups: int = 4,
        coarse_points: int = 4,
        fine_points: int = 8,
        out_points: int = 128,
        num_reused: int = 0,
        reuse_spatial: bool = False,
        keep_history: bool = False,
    ):
        """
        Args:
            d_model: width of the content vector and of the sampled features (C).
            num_groups: G.
            coarse_points: Pc; with ``fine_points`` = K each group has Pc * K sampled points.
            fine_points: K.
            out_points: P_out rows of the spatial mixing (own rows plus reused rows).
            num_reused: n, earlier stages whose channel filters are reused (the last n of the
                history); 0 for the stages before the reuse starts.
            reuse_spatial: reuse the previous stage's spatial filter for half of the P_out rows.
            keep_history: append this stage's filters to the history it received (True) or start a
                new history with them (False: the stages before the reuse starts).
        """
        super().__init__()
        if d_model % num_groups != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_groups ({num_groups})")
        if reuse_spatial and out_points % 2 != 0:
            raise ValueError(
                f"out_points must be even to reuse half of the spatial filter, got {out_points}"
            )
        if num_reused < 0:
            raise ValueError(f"num_reused must be >= 0, got {num_reused}")
        self.num_groups = num_groups
        self.group_channels = d_model // num_groups
        self.coarse_points = coarse_points
        self.fine_points = fine_points
        self.in_points = coarse_points * fine_points
        self.out_points = out_points
        self.own_rows = out_points // 2 if reuse_spatial else out_points
        self.num_reused = num_reused
        self.reuse_spatial = reuse_spatial
        self.keep_history = keep_history
        group_channels, groups = self.group_channels, num_groups
        self.m_size = group_channels * group_channels
        self.s_size = self.own_rows * self.in_points
        self.filter_generator = nn.Linear(d_model, groups * (self.m_size + self.s_size))
        self.bias_generator = nn.Linear(d_model, groups * (group_channels + out_points))
        self.out_proj = nn.Linear(groups * out_points * group_channels, d_model)
        if num_reused > 0:
            self.coarse_adapters = nn.ModuleList(
                nn.Linear(fine_points * group_channels, fine_points * group_channels)
                for _ in range(num_reused)
            )
            self.fine_adapters = nn.ModuleList(
                nn.Linear(coarse_points * group_channels, coarse_points * group_channels)
                for _ in range(num_reused)
            )
            self.channel_gates = nn.Linear(d_model, groups * group_channels * 2 * num_reused)
            self.reused_bias_generator = nn.Linear(d_model, groups * num_reused * group_channels)
        if reuse_spatial:
            self.row_gates = nn.Linear(d_model, groups * (out_points - self.own_rows))
            self.point_gates = nn.Linear(d_model, groups * self.in_points)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the authors: every generator and gate weight 0; generator biases keep PyTorch's
        default U(+-1/sqrt(d)); adapters and gate biases 0 (gates start at 0.5, adapters at 0);
        ``out_proj`` weight 0 with the default bias, so the first step sends no gradient to the
        sampler, the filters or the backbone."""
        for layer in (self.filter_generator, self.bias_generator, self.out_proj):
            layer.reset_parameters()
            nn.init.zeros_(layer.weight)
        if self.num_reused > 0:
            for layer in (
                list(self.coarse_adapters) + list(self.fine_adapters) + [self.channel_gates]
            ):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.reused_bias_generator.reset_parameters()
            nn.init.zeros_(self.reused_bias_generator.weight)
        if self.reuse_spatial:
            for layer in (self.row_gates, self.point_gates):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(
        self, sampled: Tensor, query: Tensor, history: MixingHistory = None
    ) -> Tuple[Tensor, MixingHistory]:
        """
        Args:
            sampled: (B, N, G, Pc * K, C_g) sampled features X, points in the order p * K + k.
            query: (B, N, d_model) content vectors q.
            history: list of (M (B*N*G, C_g, C_g), S (B*N*G, P_out, Pc', K)) of earlier stages,
                oldest first; it must hold at least ``num_reused`` entries (and one, with a spatial
                filter of at least Pc coarse points, for ``reuse_spatial``).

        Returns:
            (B, N, d_model) projection of the mixed features, and the history for the next stage.
        """
        batch, num_queries = query.shape[:2]
        groups, channels, rows = self.num_groups, self.group_channels, self.own_rows
        coarse, fine = self.coarse_points, self.fine_points
        units = batch * num_queries * groups
        history = list(history or [])
        if len(history) < self.num_reused or (self.reuse_spatial and not history):
            raise ValueError(
                f"CascadeMixing reuses {self.num_reused} earlier channel filters"
                f"{' and a spatial filter' if self.reuse_spatial else ''} but the history holds "
                f"{len(history)} stages"
            )

        params = self.filter_generator(query).view(units, -1)
        own_m, own_s = params.split([self.m_size, self.s_size], dim=-1)
        own_m = own_m.view(units, channels, channels)
        own_s = own_s.view(units, rows, coarse, fine)
        biases = self.bias_generator(query).view(units, -1)
        m_bias, s_bias = biases.split([channels, self.out_points], dim=-1)

        features = sampled.reshape(units, self.in_points, channels)
        mixed = F.relu(_matrix_layer_norm(torch.bmm(features, own_m) + m_bias[:, None, :]))

        if self.num_reused > 0:
            n = self.num_reused
            # Entry ((g * C_g + c) * 2 + t) * n + j: t = 0 gates output channels, t = 1 inputs.
            gates = self.channel_gates(query).sigmoid().view(units, channels, 2, n)
            reused_bias = self.reused_bias_generator(query).view(units, n, channels)
            residual = features
            for j, (earlier_m, _) in enumerate(history[-n:]):
                per_coarse = self.coarse_adapters[j](mixed.reshape(units, coarse, fine * channels))
                per_fine = (
                    mixed.view(units, coarse, fine, channels)
                    .transpose(1, 2)
                    .reshape(units, fine, -1)
                )
                per_fine = (
                    self.fine_adapters[j](per_fine)
                    .view(units, fine, coarse, channels)
                    .transpose(1, 2)
                )
                residual = (
                    per_coarse.reshape(units, -1, channels)
                    + per_fine.reshape(units, -1, channels)
                    + residual
                )
                input_gate = gates[:, :, 1, j][:, :, None]
                output_gate = gates[:, :, 0, j][:, None, :]
                gated = earlier_m * input_gate + own_m * (1 - input_gate)
                gated = gated * output_gate + own_m * (1 - output_gate)
                mixed = F.relu(
                    _matrix_layer_norm(torch.bmm(residual, gated) + reused_bias[:, j : j + 1, :])
                )

        spatial = own_s
        if self.reuse_spatial:
            previous_s = history[-1][1][:, :rows, :coarse, :]
            row_gate = self.row_gates(query).sigmoid().view(units, -1, 1, 1)
            point_gate = self.point_gates(query).sigmoid().view(units, 1, coarse, fine)
            reused_s = previous_s * row_gate + own_s * (1 - row_gate)
            reused_s = reused_s * point_gate + own_s * (1 - point_gate)
            spatial = torch.cat([own_s, reused_s], dim=1)

        out = torch.bmm(spatial.reshape(units, self.out_points, -1), mixed) + s_bias[:, :, None]
        out = F.relu(_matrix_layer_norm(out))
        entry = (own_m, spatial)
        history = history + [entry] if self.keep_history else [entry]
        return self.out_proj(out.reshape(batch, num_queries, -1)), history
