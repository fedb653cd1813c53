"""SMCA-DETR's transformers (Gao et al., ICCV 2021).

- :class:`SMCATransformer`: a DETR encoder whose layers attend over all levels jointly ("multi") or
  within each level with weights shared across levels ("intra", Sec. 3.3), and the SMCA decoder.
  One level and six "multi" layers is the single-scale SMCA; strides 16/32/64 with
  intra, intra, multi, intra, intra is the paper's multi-scale SMCA (Table 3, "2Intra-Multi-2Intra").
- :class:`ReleasedMultiScaleTransformer`: the multi-scale model the authors released
  (``Multi_scale_SMCA.zip``), a convolutional encoder over strides 8-64 and the same decoder.

Heads (class, box, query embeddings) live in the meta-architecture, as for Deformable DETR.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deformable_family.layers.mlp import MLP
from deformable_family.layers.spatially_modulated_attention import SpatiallyModulatedCoAttention

__all__ = [
    "SMCAEncoderLayer",
    "SMCAEncoder",
    "ConvMultiScaleEncoderLayer",
    "ConvMultiScaleEncoder",
    "SMCADecoderLayer",
    "SMCADecoder",
    "SMCATransformer",
    "ReleasedMultiScaleTransformer",
]

LAYER_SCOPES = ("intra", "multi")


def _check_heads(d_model: int, n_heads: int, part: str) -> None:
    # Checked before nn.MultiheadAttention, whose own check is a bare AssertionError.
    if n_heads < 1 or d_model % n_heads != 0:
        raise ValueError(
            f"d_model ({d_model}) must be divisible by the {part}'s n_heads ({n_heads}): change "
            f"{part}.n_heads or the transformer's d_model"
        )


def _flatten(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """L tensors (B, C, H_l, W_l) -> (B, S, C), each flattened row-major, levels in order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def _spatial_shapes(maps: Sequence[torch.Tensor]) -> List[Tuple[int, int]]:
    return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]


class SMCAEncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (q = k = x + pos, v = x) -> add & norm ->
    FFN -> add & norm."""

    def __init__(
        self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.1, n_heads: int = 8
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """src, pos: (B, S, d); padding_mask: (B, S) bool, True on padding -> (B, S, d)."""
        q = k = src + pos
        attended = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class SMCAEncoder(nn.Module):
    """A stack of :class:`SMCAEncoderLayer` over the flattened levels. Each layer has a scope:
    "multi" attends over the tokens of all levels jointly (multi-scale self-attention); "intra"
    applies the layer to each level on its own (intra-scale self-attention, one set of weights for
    all levels, as the paper's "weights shared across scales"). With one level both are DETR's
    encoder layer."""

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 2048,
        dropout: float = 0.1,
        n_heads: int = 8,
        layer_scopes: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            num_layers: encoder layers (each its own weights).
            d_model, d_ffn, dropout, n_heads: sizes of every layer.
            layer_scopes: one of "intra" / "multi" per layer; None = all "multi". The paper's
                multi-scale encoder is ("intra", "intra", "multi", "intra", "intra").
        """
        super().__init__()
        _check_heads(d_model, n_heads, "encoder")
        layer_scopes = ["multi"] * num_layers if layer_scopes is None else list(layer_scopes)
        if len(layer_scopes) != num_layers or any(s not in LAYER_SCOPES for s in layer_scopes):
            raise ValueError(
                f"layer_scopes must hold num_layers={num_layers} entries among {LAYER_SCOPES}, "
                f"got {layer_scopes}"
            )
        self.layer_scopes = layer_scopes
        self.layers = nn.ModuleList(
            SMCAEncoderLayer(d_model, d_ffn, dropout, n_heads) for _ in range(num_layers)
        )

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        padding_mask: torch.Tensor,
        level_sizes: Sequence[int],
    ) -> torch.Tensor:
        """src, pos: (B, S, d); padding_mask: (B, S); level_sizes: H_l * W_l of each level in
        order (summing to S) -> memory (B, S, d)."""
        for layer, scope in zip(self.layers, self.layer_scopes):
            if scope == "multi" or len(level_sizes) == 1:
                src = layer(src, pos, padding_mask)
            else:
                src = torch.cat(
                    [
                        layer(level_src, level_pos, level_mask)
                        for level_src, level_pos, level_mask in zip(
                            src.split(list(level_sizes), 1),
                            pos.split(list(level_sizes), 1),
                            padding_mask.split(list(level_sizes), 1),
                        )
                    ],
                    1,
                )
        return src


def _depthwise(channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(
        channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels
    )


class ConvMultiScaleEncoderLayer(nn.Module):
    """One layer of the authors' released multi-scale encoder (``Multi_scale_SMCA.zip``): no
    attention, depthwise convolutions within and across neighbouring levels, shared 1x1 convs, FFN.

    For the L maps x_l (finest first) with positions p_l:
        a_l = level_convs[l](in_conv(x_l + p_l))                      (depthwise k x k, per level)
        x_l = x_l + dropout(out_conv(a_l + up(l) + down(l)))
        up(l) = bilinear resize (align_corners=True) of up_convs(a_{l+1}) to a_l's size   (l < L-1)
        down(l) = down_convs(a_{l-1}), depthwise k x k stride 2                           (l > 0)
        x_l = LN2(LN1(x_l) + FFN(LN1(x_l)))
    in_conv, out_conv, the FFN and both norms are shared by all levels. The cross-level convs are one
    pair shared by all neighbouring levels (the 44.4 AP release, ``transformer_44_dot_4.py``) or one
    pair per neighbouring pair (``transformer.py``). As the authors', the padding mask is not used.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        num_levels: int = 4,
        kernel_size: int = 7,
        share_cross_level_convs: bool = True,
    ):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"the convolutional encoder needs >= 2 levels, got {num_levels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        num_pairs = 1 if share_cross_level_convs else num_levels - 1
        self.num_levels = num_levels
        self.share_cross_level_convs = share_cross_level_convs
        self.in_conv = nn.Conv2d(d_model, d_model, 1)
        self.level_convs = nn.ModuleList(
            _depthwise(d_model, kernel_size, 1) for _ in range(num_levels)
        )
        self.down_convs = nn.ModuleList(
            _depthwise(d_model, kernel_size, 2) for _ in range(num_pairs)
        )
        self.up_convs = nn.ModuleList(_depthwise(d_model, kernel_size, 1) for _ in range(num_pairs))
        self.out_conv = nn.Conv2d(d_model, d_model, 1)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def _pair(self, convs: nn.ModuleList, finer_level: int) -> nn.Module:
        return convs[0] if self.share_cross_level_convs else convs[finer_level]

    def forward(
        self, maps: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """maps, pos: L tensors (B, d, H_l, W_l), each level twice the stride of the previous ->
        L tensors of the same shapes."""
        mixed = [conv(self.in_conv(x + p)) for conv, x, p in zip(self.level_convs, maps, pos)]
        outputs = []
        for level, (x, a) in enumerate(zip(maps, mixed)):
            total = a
            if level + 1 < self.num_levels:
                coarser = self._pair(self.up_convs, level)(mixed[level + 1])
                total = total + F.interpolate(
                    coarser, size=a.shape[-2:], mode="bilinear", align_corners=True
                )
            if level > 0:
                finer = self._pair(self.down_convs, level - 1)(mixed[level - 1])
                if finer.shape[-2:] != a.shape[-2:]:
                    raise ValueError(
                        f"level {level} is {tuple(a.shape[-2:])} but the stride-2 conv of level "
                        f"{level - 1} gives {tuple(finer.shape[-2:])}: the levels must be at "
                        "consecutive strides (each twice the previous)"
                    )
                total = total + finer
            x = x + self.dropout1(self.out_conv(total))
            batch, channels, height, width = x.shape
            x = self.norm1(x.flatten(2).transpose(1, 2))
            x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
            outputs.append(x.transpose(1, 2).reshape(batch, channels, height, width))
        return outputs


class ConvMultiScaleEncoder(nn.Module):
    """A stack of :class:`ConvMultiScaleEncoderLayer` (the authors' released multi-scale encoder)."""

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        num_levels: int = 4,
        kernel_size: int = 7,
        share_cross_level_convs: bool = True,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            ConvMultiScaleEncoderLayer(
                d_model, d_ffn, dropout, num_levels, kernel_size, share_cross_level_convs
            )
            for _ in range(num_layers)
        )

    def forward(
        self, maps: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        for layer in self.layers:
            maps = layer(maps, pos)
        return list(maps)


class SMCADecoderLayer(nn.Module):
    """Self-attention -> add & norm -> spatially modulated co-attention -> add & norm -> FFN ->
    add & norm (post-norm). The offsets, scales and scale-selection weights are predicted from
    ``modulation_norm(query + query_pos)`` of the layer's input (the authors' ``norm4``)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 2048,
        dropout: float = 0.1,
        n_heads: int = 8,
        num_levels: int = 1,
        scale_type: str = "independent",
        smooth: float = 8.0,
        reference_stride: float = 32.0,
    ):
        super().__init__()
        self.modulation_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = SpatiallyModulatedCoAttention(
            d_model, n_heads, num_levels, scale_type, smooth, dropout, reference_stride
        )
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.ffn_dropout1 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.ffn_dropout2 = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(d_model)

    def modulation_input(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """(B, Q, d) -> (B, Q, d): what this layer's centre offsets, scales and scale weights (and,
        for the first layer, the query centres) are predicted from."""
        return self.modulation_norm(query + query_pos)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        modulation_input: torch.Tensor,
        centres: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        level_strides: Sequence[float],
        memory_padding_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            query, query_pos: (B, Q, d) content and positional parts of the queries.
            modulation_input: (B, Q, d) from :meth:`modulation_input`.
            centres: (B, Q, 2) query centres (x, y) in input-image pixels.
            memory, memory_pos: (B, S, d) keys/values and their positions.
            spatial_shapes, level_strides: the L levels of the memory (see
                :class:`SpatiallyModulatedCoAttention`).
            memory_padding_mask: (B, S) True on padding.

        Returns:
            (B, Q, d).
        """
        q = k = query + query_pos
        attended = self.self_attn(q, k, query, need_weights=False)[0]
        query = self.self_attn_norm(query + self.self_attn_dropout(attended))
        attended = self.cross_attn(
            query + query_pos,
            memory + memory_pos,
            memory,
            modulation_input,
            centres,
            spatial_shapes,
            level_strides,
            memory_padding_mask,
        )
        query = self.cross_attn_norm(query + self.cross_attn_dropout(attended))
        ffn = self.linear2(self.ffn_dropout1(F.relu(self.linear1(query))))
        return self.ffn_norm(query + self.ffn_dropout2(ffn))


class SMCADecoder(nn.Module):
    """A stack of :class:`SMCADecoderLayer` with the query-centre head and the final norm.

    The centre of each query is predicted once, by the first layer (Eq. 3; the authors' ``point1``,
    a 3-layer MLP where the paper says 2), and reused by every layer: there is no refinement. As the
    decoder content starts at zero, the centres depend only on the query embeddings.
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 2048,
        dropout: float = 0.1,
        n_heads: int = 8,
        num_levels: int = 1,
        scale_type: str = "independent",
        smooth: float = 8.0,
        reference_stride: float = 32.0,
    ):
        """
        Args:
            num_layers: decoder layers.
            d_model, d_ffn, dropout, n_heads: sizes of every layer.
            num_levels: feature maps the co-attention attends to (with scale selection when > 1).
            scale_type, smooth, reference_stride: see :class:`SpatiallyModulatedCoAttention`.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the decoder needs >= 1 layer, got num_layers={num_layers}")
        _check_heads(d_model, n_heads, "decoder")
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.layers = nn.ModuleList(
            SMCADecoderLayer(
                d_model, d_ffn, dropout, n_heads, num_levels, scale_type, smooth, reference_stride
            )
            for _ in range(num_layers)
        )
        self.centre_head = MLP(d_model, d_model, 2, 3)
        # Applied to every layer's output before the heads (the authors' decoder norm).
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_padding_mask: torch.Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        level_strides: Sequence[float],
        image_sizes: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query_pos: (B, Q, d) query embeddings (positional part; the content starts at zero).
            memory, memory_pos: (B, S, d); memory_padding_mask: (B, S) True on padding.
            spatial_shapes, level_strides: the L levels of the memory.
            image_sizes: (B, 2) unpadded (width, height) of each input image, in pixels.

        Returns:
            hidden states (D, B, Q, d) after the final norm; centre logits (B, Q, 2) (x, y), whose
            sigmoid is the centre relative to the unpadded image.
        """
        query = torch.zeros_like(query_pos)
        hidden_states = []
        centre_logits = centres = None
        for index, layer in enumerate(self.layers):
            modulation_input = layer.modulation_input(query, query_pos)
            if index == 0:
                centre_logits = self.centre_head(modulation_input)
                # Relative to the unpadded image, as the boxes (the authors read targets["size"]).
                centres = centre_logits.sigmoid() * image_sizes[:, None, :].to(centre_logits.dtype)
            query = layer(
                query,
                query_pos,
                modulation_input,
                centres,
                memory,
                memory_pos,
                spatial_shapes,
                level_strides,
                memory_padding_mask,
            )
            hidden_states.append(self.norm(query))
        return torch.stack(hidden_states), centre_logits


def _smca_reset_parameters(transformer: nn.Module) -> None:
    """The authors' initialisation: xavier_uniform for every matrix of the transformer, then each
    co-attention's own (zero attention biases, scales starting at 1)."""
    for parameter in transformer.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)
    for module in transformer.modules():
        if isinstance(module, SpatiallyModulatedCoAttention):
            module.reset_parameters()


class SMCATransformer(nn.Module):
    """Encoder (:class:`SMCAEncoder`) + SMCA decoder over the backbone's L levels.

    Single-scale SMCA: L = 1 (C5). The paper's multi-scale SMCA: L = 3 (strides 16, 32, 64), a
    level embedding added to each level's position embedding (the paper does not say how
    positions of E_16/E_32/E_64 are formed; this is what the authors' released multi-scale model
    does), and the decoder attends to the three encoded maps with scale selection.
    """

    def __init__(
        self,
        encoder: SMCAEncoder,
        decoder: SMCADecoder,
        d_model: int = 256,
        num_levels: int = 1,
    ):
        """
        Args:
            encoder, decoder: built with the same d_model; decoder.num_levels = num_levels.
            d_model: channels of the features and queries.
            num_levels: backbone levels; > 1 adds a level embedding (num_levels, d_model).
        """
        super().__init__()
        if decoder.num_levels != num_levels:
            raise ValueError(
                f"decoder.num_levels ({decoder.num_levels}) must equal num_levels ({num_levels}): "
                "the decoder attends to every encoder level"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.num_levels = num_levels
        self.level_embed = (
            nn.Parameter(torch.empty(num_levels, d_model)) if num_levels > 1 else None
        )
        _smca_reset_parameters(self)
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)

    def decoder_level_strides(self, level_strides: Sequence[float]) -> List[float]:
        """Strides of the maps the decoder attends to, from the backbone's level strides."""
        return list(level_strides)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor,
        level_strides: Sequence[float],
        image_sizes: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            features, pos_embeds: L maps (B, d, H_l, W_l); masks: L (B, H_l, W_l) bool, True on
                padding.
            query_embed: (Q, d) learned query embeddings.
            level_strides: L strides (pixels) of the levels.
            image_sizes: (B, 2) unpadded (width, height) in pixels.

        Returns:
            {"hidden_states": (D, B, Q, d), "centre_logits": (B, Q, 2)}.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"features must hold {self.num_levels} levels, got {len(features)}")
        if self.level_embed is not None:
            pos_embeds = [
                pos + self.level_embed[level].view(1, -1, 1, 1)
                for level, pos in enumerate(pos_embeds)
            ]
        spatial_shapes = _spatial_shapes(features)
        src, pos = _flatten(features), _flatten(pos_embeds)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        memory = self.encoder(src, pos, mask, [h * w for h, w in spatial_shapes])
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        hidden_states, centre_logits = self.decoder(
            query_pos,
            memory,
            pos,
            mask,
            spatial_shapes,
            self.decoder_level_strides(level_strides),
            image_sizes,
        )
        return {"hidden_states": hidden_states, "centre_logits": centre_logits}


class ReleasedMultiScaleTransformer(nn.Module):
    """The authors' released multi-scale SMCA (``Multi_scale_SMCA.zip``, the 44.4 AP model of
    ``transformer_44_dot_4.py``): the convolutional encoder over L levels (strides 8-64), then
    the decoder attends to L maps: the finest encoded level through a 3x3 stride-2 conv
    (``downsample_finest``, so at the second level's stride, with the second level's position,
    mask and cell grid), then levels 1..L-1. A level embedding (L, d) is added to every level's
    position embedding.
    """

    def __init__(
        self,
        encoder: ConvMultiScaleEncoder,
        decoder: SMCADecoder,
        d_model: int = 256,
        num_levels: int = 4,
    ):
        super().__init__()
        encoder_levels = {layer.num_levels for layer in encoder.layers}
        if encoder_levels and encoder_levels != {num_levels}:
            raise ValueError(
                f"encoder.num_levels ({sorted(encoder_levels)}) must equal num_levels ({num_levels})"
            )
        if decoder.num_levels != num_levels:
            raise ValueError(
                f"decoder.num_levels ({decoder.num_levels}) must equal num_levels ({num_levels}): "
                "the decoder attends to the down-sampled finest level and the L - 1 others"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.d_model = d_model
        self.num_levels = num_levels
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        _smca_reset_parameters(self)
        nn.init.normal_(self.level_embed)
        # Created after the xavier pass, as the authors' (PyTorch's default initialisation).
        self.downsample_finest = nn.Conv2d(d_model, d_model, 3, stride=2, padding=1)

    def decoder_level_strides(self, level_strides: Sequence[float]) -> List[float]:
        """The decoder's maps: the finest level down-sampled by 2, then the others."""
        return [2 * level_strides[0]] + list(level_strides[1:])

    def forward(
        self,
        features: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        pos_embeds: Sequence[torch.Tensor],
        query_embed: torch.Tensor,
        level_strides: Sequence[float],
        image_sizes: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Arguments and outputs as :meth:`SMCATransformer.forward`."""
        if len(features) != self.num_levels:
            raise ValueError(f"features must hold {self.num_levels} levels, got {len(features)}")
        pos_embeds = [
            pos + self.level_embed[level].view(1, -1, 1, 1) for level, pos in enumerate(pos_embeds)
        ]
        encoded = self.encoder(features, pos_embeds)
        keys = [self.downsample_finest(encoded[0])] + encoded[1:]
        if keys[0].shape[-2:] != keys[1].shape[-2:]:
            raise ValueError(
                f"the down-sampled finest level is {tuple(keys[0].shape[-2:])} but level 1 is "
                f"{tuple(keys[1].shape[-2:])}: the levels must be at consecutive strides"
            )
        # The down-sampled finest level takes level 1's position, mask and grid.
        key_pos = [pos_embeds[1]] + pos_embeds[1:]
        key_masks = [masks[1]] + list(masks[1:])
        spatial_shapes = _spatial_shapes(keys)
        memory, pos = _flatten(keys), _flatten(key_pos)
        mask = torch.cat([m.flatten(1) for m in key_masks], 1)
        query_pos = query_embed.unsqueeze(0).expand(memory.shape[0], -1, -1)
        hidden_states, centre_logits = self.decoder(
            query_pos,
            memory,
            pos,
            mask,
            spatial_shapes,
            self.decoder_level_strides(level_strides),
            image_sizes,
        )
        return {"hidden_states": hidden_states, "centre_logits": centre_logits}
