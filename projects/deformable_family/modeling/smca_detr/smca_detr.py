"""SMCA-DETR meta-architecture (Gao et al., "Fast Convergence of DETR with Spatially Modulated
Co-Attention", ICCV 2021) for detectron2."""

from typing import Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY

from deformable_family.layers.mlp import MLP
from deformable_family.modeling.deformable_detr.deformable_detr import DeformableDETR, _class_head

from .transformer import ReleasedMultiScaleTransformer, SMCATransformer

__all__ = ["SMCADETR", "boxes_from_centres"]


def boxes_from_centres(box_delta: torch.Tensor, centre_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (12): box = sigmoid(MLP(D) + [c_x, c_y, 0, 0]), with c the query centre before the
    sigmoid (relative to the unpadded image).

    Args:
        box_delta: (..., B, Q, 4) box-head outputs.
        centre_logits: (B, Q, 2) centre logits (x, y).

    Returns:
        (..., B, Q, 4) normalised (cx, cy, w, h).
    """
    return (box_delta + F.pad(centre_logits, (0, 2))).sigmoid()


def unpadded_sizes(mask: torch.Tensor) -> torch.Tensor:
    """mask: (B, H, W) bool, True on padding (images padded at the bottom and right) -> (B, 2)
    float (width, height) of each image in pixels."""
    width = (~mask[:, 0, :]).sum(1)
    height = (~mask[:, :, 0]).sum(1)
    return torch.stack([width, height], -1).float()


@META_ARCH_REGISTRY.register()
class SMCADETR(nn.Module):
    """Backbone -> SMCA transformer -> one class head and one box head shared by every decoder
    layer.

    The same class serves the three SMCA models, told apart by the transformer it is given:
    :class:`SMCATransformer` with one level (single-scale SMCA) or three levels (the paper's
    multi-scale SMCA), or :class:`ReleasedMultiScaleTransformer` (the authors' released
    multi-scale model). Boxes are predicted relative to each query's centre (Eq. 12).

    The authors' class head has a (num_classes + 1)-th "no-object" logit although the loss is a
    sigmoid focal loss; ours has num_classes logits (d_model + 1 = 257 parameters fewer), so that the
    shared criterion, matcher and post-processing apply unchanged.
    """

    # Input handling is the family's: normalisation, padding mask, and targets relative to the
    # unpadded image (see DeformableDETR). The methods only read pixel_mean, pixel_std,
    # input_format and device.
    preprocess_image = DeformableDETR.preprocess_image
    prepare_targets = DeformableDETR.prepare_targets
    device = DeformableDETR.device
    # Training (losses) and inference (detections to Instances) as Deformable DETR's, on this
    # model's forward_outputs.
    forward = DeformableDETR.forward

    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: Union[SMCATransformer, ReleasedMultiScaleTransformer],
        criterion: nn.Module,
        num_classes: int = 80,
        num_queries: int = 300,
        aux_loss: bool = True,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
        select_topk: int = 100,
    ):
        """
        Args:
            backbone: returns a dict of L maps (B, d_model, H_l, W_l) in increasing stride, e.g.
                :class:`MultiScaleResNet`; its ``output_shape()`` gives the strides the Gaussian
                priors use (32 for C5: the nominal stride, as the authors' constant).
            position_embedding: mask (B, H, W) -> (B, d_model, H, W), e.g.
                :class:`PositionEmbeddingSine` with ``offset=0.0`` (DETR's normalisation).
            transformer: :class:`SMCATransformer` or :class:`ReleasedMultiScaleTransformer` with
                the backbone's number of levels and d_model.
            criterion: ``criterion(outputs, targets)`` -> dict of weighted losses (``SetCriterion``).
            num_classes: foreground classes (80 for detectron2's COCO; 91 for the authors' ids).
            num_queries: decoder queries (learned embeddings; the authors' 300).
            aux_loss: supervise every decoder layer (``aux_outputs``).
            pixel_mean, pixel_std: per-channel normalisation in ``input_format`` order, 0-255 scale.
            input_format: channel order of ``batched_inputs[i]["image"]`` ("RGB" or "BGR").
            select_topk: detections kept per image at inference.
        """
        super().__init__()
        if not isinstance(transformer, (SMCATransformer, ReleasedMultiScaleTransformer)):
            raise TypeError(
                "transformer must be an SMCATransformer or a ReleasedMultiScaleTransformer, got "
                f"{type(transformer).__name__}"
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"pixel_mean and pixel_std must have 3 values, got {pixel_mean} and {pixel_std}"
            )
        backbone_levels = list(backbone.output_shape().values())
        if len(backbone_levels) != transformer.num_levels:
            raise ValueError(
                f"backbone gives {len(backbone_levels)} levels (strides "
                f"{[shape.stride for shape in backbone_levels]}) but transformer.num_levels is "
                f"{transformer.num_levels}: change the backbone's in_features/num_extra_levels or "
                "transformer.num_levels (and decoder.num_levels)"
            )
        d_model = transformer.d_model
        bad_channels = [shape.channels for shape in backbone_levels if shape.channels != d_model]
        if bad_channels:
            raise ValueError(
                f"backbone levels must have d_model={d_model} channels, got {bad_channels}"
            )
        pos_channels = 2 * getattr(position_embedding, "num_pos_feats", d_model // 2)
        if pos_channels != d_model:
            raise ValueError(
                f"position_embedding gives {pos_channels} channels (2 * num_pos_feats) but d_model "
                f"is {d_model}: set num_pos_feats to {d_model // 2}"
            )
        level_strides = [shape.stride for shape in backbone_levels]
        if isinstance(transformer, ReleasedMultiScaleTransformer):
            doubling = all(b == 2 * a for a, b in zip(level_strides, level_strides[1:]))
            if not doubling:
                raise ValueError(
                    f"the released multi-scale transformer needs levels at consecutive strides "
                    f"(each twice the previous), got strides {level_strides}"
                )

        self.backbone = backbone
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.input_format = input_format
        self.select_topk = select_topk
        self.level_strides = level_strides

        # The authors' DETR heads: class bias at prior 0.01, PyTorch's default for the rest (the box
        # head's last layer is not zeroed); query embeddings N(0, 1), positional only.
        self.class_embed = _class_head(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d_model)

        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    def forward_outputs(self, images: torch.Tensor, mask: torch.Tensor) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True on padding.

        Returns:
            {"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) normalised cxcywh relative to the
            unpadded image, "aux_outputs": [...] for decoder layers 0..D-2 when aux_loss,
            "centre_logits": (B, Q, 2) the query centres before the sigmoid}.
        """
        features = list(self.backbone(images).values())
        masks = [
            F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in features
        ]
        pos_embeds = [self.position_embedding(m).to(f.dtype) for m, f in zip(masks, features)]
        transformer_outputs = self.transformer(
            features,
            masks,
            pos_embeds,
            self.query_embed.weight,
            self.level_strides,
            unpadded_sizes(mask),
        )
        hidden_states = transformer_outputs["hidden_states"]  # (D, B, Q, d)
        centre_logits = transformer_outputs["centre_logits"]
        logits = self.class_embed(hidden_states)
        boxes = boxes_from_centres(self.bbox_embed(hidden_states), centre_logits)
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "centre_logits": centre_logits,
        }
        if self.aux_loss:
            outputs["aux_outputs"] = [
                {"pred_logits": layer_logits, "pred_boxes": layer_boxes}
                for layer_logits, layer_boxes in zip(logits[:-1], boxes[:-1])
            ]
        return outputs
