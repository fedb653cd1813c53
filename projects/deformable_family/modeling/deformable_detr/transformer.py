"""Deformable DETR's transformer: deformable encoder, decoder, and two-stage proposals.

The prediction heads are NOT owned here: they live in the meta-architecture and are passed to
:meth:`DeformableTransformer.forward` as call arguments, so each head has exactly one state-dict key.
"""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deformable_family.layers.deformable_attention import MSDeformAttn
from deformable_family.layers.dropout import Dropout  # nn.Dropout, cheaper CPU mask
from deformable_family.layers.position_encoding import sine_embedding
from deformable_family.modeling.box_ops import inverse_sigmoid


def flatten_levels(
    features: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    pos_embeds: Sequence[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten L maps row-major and concatenate them in level order.

    Args:
        features, pos_embeds: L tensors (B, C, H_l, W_l).
        masks: L tensors (B, H_l, W_l) bool, True on padding.

    Returns:
        features (B, S, C), masks (B, S), pos_embeds (B, S, C), spatial_shapes (L, 2) int64 (H_l, W_l),
        level_start_index (L,) int64; S = sum of H_l * W_l.
    """
    # Built on the host, then copied without blocking: torch.as_tensor(..., device="cuda") would
    # wait for the GPU queue to drain (a blocking host-to-device copy synchronises the stream).
    spatial_shapes = torch.as_tensor([tuple(f.shape[-2:]) for f in features], dtype=torch.long).to(
        features[0].device, non_blocking=True
    )
    level_start_index = torch.cat(
        (
            spatial_shapes.new_zeros((1,)),
            (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1],
        )
    )
    flat_features = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
    flat_masks = torch.cat([m.flatten(1) for m in masks], 1)
    flat_pos = torch.cat([p.flatten(2).transpose(1, 2) for p in pos_embeds], 1)
    return flat_features, flat_masks, flat_pos, spatial_shapes, level_start_index


def level_sizes(
    spatial_shapes: torch.Tensor, spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None
) -> List[Tuple[int, int]]:
    """The (H_l, W_l) of each level as Python ints: spatial_shapes_list when the caller has it (read
    off the feature maps' shapes, no device access), else read from the tensor (for a GPU tensor a
    device-to-host copy, which synchronises and cannot be captured in a CUDA graph)."""
    if spatial_shapes_list is not None:
        return [(height, width) for height, width in spatial_shapes_list]
    return [(height, width) for height, width in spatial_shapes.tolist()]


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, H, W) bool, True on padding -> (B, 2) float: valid fraction of (width, height).

    Images are padded at the bottom and right, so the valid extent is read off the first column/row.
    """
    _, height, width = mask.shape
    valid_height = (~mask[:, :, 0]).sum(1)
    valid_width = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_width.float() / width, valid_height.float() / height], -1)


def encoder_reference_points(
    spatial_shapes: torch.Tensor,
    valid_ratios: torch.Tensor,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """Reference points of the encoder queries: each pixel centre, normalised by the valid extent of
    its level, then re-expressed on every level (multiplied by that level's valid ratio).

    Args:
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        valid_ratios: (B, L, 2) valid fraction of (width, height) per level.
        spatial_shapes_list: the same sizes as Python ints, if known (see :func:`level_sizes`).

    Returns:
        (B, S, L, 2) normalised (x, y) of each of the S pixels on each level.
    """
    points = []
    for level, (height, width) in enumerate(level_sizes(spatial_shapes, spatial_shapes_list)):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(
                0.5, height - 0.5, height, dtype=torch.float32, device=valid_ratios.device
            ),
            torch.linspace(
                0.5, width - 0.5, width, dtype=torch.float32, device=valid_ratios.device
            ),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


def encoder_proposals(
    memory_padding_mask: torch.Tensor,
    spatial_shapes: torch.Tensor,
    base_size: float = 0.05,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage proposals: one box per encoder pixel, (cx, cy, s, s) with s = base_size * 2^l.

    Args:
        memory_padding_mask: (B, S) bool, True on padding.
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        base_size: box side on the first level, normalised.
        spatial_shapes_list: the same sizes as Python ints, if known (see :func:`level_sizes`).

    Returns:
        proposals (B, S, 4) in inverse-sigmoid space, +inf where padded or outside (0.01, 0.99);
        valid (B, S, 1) bool, False for those.
    """
    batch = memory_padding_mask.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(level_sizes(spatial_shapes, spatial_shapes_list)):
        mask = memory_padding_mask[:, start : start + height * width].view(batch, height, width)
        valid_height = (~mask[:, :, 0]).sum(1)
        valid_width = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, height - 1, height, dtype=torch.float32, device=mask.device),
            torch.linspace(0, width - 1, width, dtype=torch.float32, device=mask.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_width, valid_height], -1).view(batch, 1, 1, 2).float()
        centres = (grid.unsqueeze(0) + 0.5) / scale
        sizes = torch.full_like(centres, base_size * (2.0**level))
        proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    return proposals, valid


def refine_boxes(box_delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """box = sigmoid(delta + inverse_sigmoid(reference)) (paper, appendix A.4).

    Args:
        box_delta: (..., 4) output of a box head.
        reference: (..., 4) normalised boxes, or (..., 2) normalised points (then only the centre is
            offset; the size is sigmoid(delta)).

    Returns:
        (..., 4) normalised (cx, cy, w, h).
    """
    if reference.shape[-1] == 4:
        return (box_delta + inverse_sigmoid(reference)).sigmoid()
    if reference.shape[-1] == 2:
        centre = box_delta[..., :2] + inverse_sigmoid(reference)
        return torch.cat([centre, box_delta[..., 2:]], -1).sigmoid()
    raise ValueError(f"reference must end with 2 or 4 coordinates, got {tuple(reference.shape)}")


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention -> add & norm -> FFN -> add & norm (post-norm).

    ``attn_backend``: the :class:`MSDeformAttn` implementation, "extension" or "triton".
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attn_backend: str = "extension",
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    ) -> torch.Tensor:
        """src, pos: (B, S, d); reference_points: (B, S, L, 2); padding_mask: (B, S) -> (B, S, d).
        spatial_shapes_list: the level sizes as Python ints, if known (see MSDeformAttn)."""
        attended = self.self_attn(
            src + pos,
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
            spatial_shapes_list=spatial_shapes_list,
        )
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` over the flattened multi-scale maps.

    ``attn_backend``: the :class:`MSDeformAttn` implementation, "extension" or "triton".
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attn_backend: str = "extension",
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                d_model, d_ffn, dropout, n_levels, n_heads, n_points, attn_backend
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    ) -> torch.Tensor:
        """src, pos: (B, S, d); valid_ratios: (B, L, 2); padding_mask: (B, S) -> memory (B, S, d).
        spatial_shapes_list: the level sizes as Python ints, if known (then no tensor is read on the
        host; see :func:`level_sizes`)."""
        spatial_shapes_list = level_sizes(spatial_shapes, spatial_shapes_list)
        reference_points = encoder_reference_points(
            spatial_shapes, valid_ratios, spatial_shapes_list
        )
        for layer in self.layers:
            src = layer(
                src,
                pos,
                reference_points,
                spatial_shapes,
                level_start_index,
                padding_mask,
                spatial_shapes_list=spatial_shapes_list,
            )
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention -> add & norm -> deformable cross-attention -> add & norm -> FFN -> add & norm.

    ``post_cross_attn``, when given, runs between the cross-attention's add & norm and the FFN as
    ``query = post_cross_attn(query, reference_points)`` (DSCT's SSRA on its subject tokens).
    ``attn_backend``: the :class:`MSDeformAttn` implementation, "extension" or "triton".
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        post_cross_attn: Optional[nn.Module] = None,
        attn_backend: str = "extension",
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.self_attn_dropout = Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_backend)
        self.cross_attn_dropout = Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.ffn_dropout1 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.ffn_dropout2 = Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.post_cross_attn = post_cross_attn

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query, query_pos: (B, Q, d) content and positional parts of the queries.
            reference_points: (B, Q, L, 2) points or (B, Q, L, 4) boxes, per level.
            memory: (B, S, d) encoder output; memory_padding_mask: (B, S) True on padding.
            spatial_shapes_list: the level sizes as Python ints, if known (see MSDeformAttn).

        Returns:
            (B, Q, d).
        """
        # nn.MultiheadAttention is sequence-first: (Q, B, d).
        q = k = (query + query_pos).transpose(0, 1)
        attended = self.self_attn(q, k, query.transpose(0, 1))[0].transpose(0, 1)
        query = self.self_attn_norm(query + self.self_attn_dropout(attended))
        attended = self.cross_attn(
            query + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
            spatial_shapes_list=spatial_shapes_list,
        )
        query = self.cross_attn_norm(query + self.cross_attn_dropout(attended))
        if self.post_cross_attn is not None:
            query = self.post_cross_attn(query, reference_points)
        ffn = self.linear2(self.ffn_dropout1(F.relu(self.linear1(query))))
        return self.ffn_norm(query + self.ffn_dropout2(ffn))


class DeformableDecoder(nn.Module):
    """A stack of :class:`DeformableDecoderLayer`; with box heads given, each layer refines the
    reference boxes of the next (iterative bounding-box refinement, appendix A.4).

    ``post_cross_attn``: a module each layer runs between cross-attention and FFN (a deep copy per
    layer, see :class:`DeformableDecoderLayer`); None for Deformable DETR.
    ``attn_backend``: the :class:`MSDeformAttn` implementation, "extension" or "triton".
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        post_cross_attn: Optional[nn.Module] = None,
        attn_backend: str = "extension",
    ):
        super().__init__()
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                d_model,
                d_ffn,
                dropout,
                n_levels,
                n_heads,
                n_points,
                copy.deepcopy(post_cross_attn),
                attn_backend,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        box_heads: Optional[Sequence[nn.Module]] = None,
        spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            query, query_pos: (B, Q, d).
            reference_points: (B, Q, 2) normalised points or (B, Q, 4) normalised boxes, relative to
                the unpadded image.
            memory: (B, S, d); valid_ratios: (B, L, 2); memory_padding_mask: (B, S).
            box_heads: one box head per layer for iterative refinement, or None (references fixed).
            spatial_shapes_list: the level sizes as Python ints, if known (see MSDeformAttn).

        Returns:
            hidden states (D, B, Q, d) and the D references the layers used, each (B, Q, 2) or
            (B, Q, 4) (2-d points become boxes after the first refinement); with refinement the references of layers 1.. are detached (gradients do not flow across layers
            through them, as in the authors' code).
        """
        if box_heads is not None and len(box_heads) != self.num_layers:
            raise ValueError(f"box_heads must hold {self.num_layers} heads, got {len(box_heads)}")
        hidden_states: List[torch.Tensor] = []
        references: List[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
            else:
                ratios = valid_ratios
            # References are relative to the unpadded image; the sampler works on the padded map.
            per_level = reference_points[:, :, None] * ratios[:, None]
            query = layer(
                query,
                query_pos,
                per_level,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                spatial_shapes_list=spatial_shapes_list,
            )
            hidden_states.append(query)
            references.append(reference_points)
            if box_heads is not None:
                reference_points = refine_boxes(box_heads[index](query), reference_points).detach()
        return torch.stack(hidden_states), references


class DeformableTransformer(nn.Module):
    """Level embedding + encoder + query initialisation (learned, or two-stage proposals) + decoder."""

    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: DeformableDecoder,
        d_model: int = 256,
        num_levels: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
    ):
        """
        Args:
            encoder, decoder: built with the same d_model and num_levels.
            d_model: channels of the features and queries.
            num_levels: number of feature levels (the level embedding has one row per level).
            two_stage: queries come from the top-scoring encoder proposals instead of learned embeddings.
            two_stage_num_proposals: proposals kept for the decoder (the number of queries).
        """
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.num_levels = num_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The authors: xavier_uniform for every matrix, then the attention modules' own init.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """proposals: (B, K, 4) in inverse-sigmoid space -> (B, K, 2 * d_model) sine embedding of the
        sigmoid box, d_model / 2 features per coordinate, scaled to [0, 2*pi]."""
        return sine_embedding(proposals.sigmoid() * (2 * math.pi), self.d_model // 2)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: Optional[torch.Tensor] = None,
        box_heads: Optional[Sequence[nn.Module]] = None,
        proposal_class_head: Optional[nn.Module] = None,
        proposal_box_head: Optional[nn.Module] = None,
    ) -> Dict[str, object]:
        """
        Args:
            features, pos_embeds: L maps (B, d, H_l, W_l); masks: L (B, H_l, W_l) bool, True on padding.
            query_embed: (Q, 2 * d) learned queries (positional half, then content half); None for two-stage.
            box_heads: per-decoder-layer box heads for iterative refinement, or None.
            proposal_class_head, proposal_box_head: two-stage heads applied to the encoder output.

        Returns:
            dict with "hidden_states" (D, B, Q, d), "references" (D tensors (B, Q, 2 or 4)), and for two-stage
            "enc_logits" (B, S, K) and "enc_boxes" (B, S, 4) normalised cxcywh.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"features must hold {self.num_levels} levels, got {len(features)}")
        pos_embeds = [
            pos + self.level_embed[level].view(1, -1, 1, 1) for level, pos in enumerate(pos_embeds)
        ]
        src, mask, pos, spatial_shapes, level_start_index = flatten_levels(
            features, masks, pos_embeds
        )
        # The level sizes as Python ints, from the maps' shapes: every layer gets them, so no level
        # tensor is read back from the GPU (no synchronisation per layer, CUDA-graph capturable).
        # Not under torch.jit.trace (fvcore's flop counter), where shapes are traced as tensors.
        spatial_shapes_list = (
            None if torch.jit.is_tracing() else [tuple(f.shape[-2:]) for f in features]
        )
        valid_ratios = torch.stack([valid_ratios_of(m) for m in masks], 1)
        memory = self.encoder(
            src,
            pos,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask,
            spatial_shapes_list=spatial_shapes_list,
        )

        outputs: Dict[str, object] = {}
        batch = memory.shape[0]
        if self.two_stage:
            if proposal_class_head is None or proposal_box_head is None:
                raise ValueError("two_stage needs proposal_class_head and proposal_box_head")
            proposals, valid = encoder_proposals(
                mask, spatial_shapes, spatial_shapes_list=spatial_shapes_list
            )
            enc_memory = memory.masked_fill(mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
            enc_memory = self.enc_output_norm(self.enc_output(enc_memory))
            enc_logits = proposal_class_head(enc_memory)
            enc_boxes_unact = proposal_box_head(enc_memory) + proposals
            # Rank by the first (foreground) logit; the chosen boxes enter the decoder detached.
            topk = min(self.two_stage_num_proposals, enc_logits.shape[1])
            topk_index = torch.topk(enc_logits[..., 0], topk, dim=1)[1]
            topk_boxes_unact = torch.gather(
                enc_boxes_unact, 1, topk_index.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_boxes_unact.sigmoid()
            query_pos, query = torch.split(
                self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_boxes_unact))),
                self.d_model,
                dim=2,
            )
            outputs["enc_logits"] = enc_logits
            outputs["enc_boxes"] = enc_boxes_unact.sigmoid()
        else:
            if query_embed is None:
                raise ValueError("query_embed is required unless two_stage")
            query_pos, query = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            query = query.unsqueeze(0).expand(batch, -1, -1)
            # The sigmoid in float32 even under autocast: a 16-bit reference point near 1.0 would
            # be off by about half a pixel on a 134-pixel-wide level (rounding the logit costs far
            # less).
            logits = self.reference_points(query_pos)
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            reference_points = logits.sigmoid()

        hidden_states, references = self.decoder(
            query,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask,
            box_heads=box_heads,
            spatial_shapes_list=spatial_shapes_list,
        )
        outputs["hidden_states"] = hidden_states
        outputs["references"] = references
        return outputs
