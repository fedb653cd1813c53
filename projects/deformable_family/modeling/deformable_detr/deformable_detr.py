"""Deformable DETR meta-architecture (Zhu et al., ICLR 2021) for detectron2."""

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from deformable_family.layers.mlp import MLP
from deformable_family.layers.position_encoding import PositionEmbeddingSine
from deformable_family.modeling.box_ops import box_xyxy_to_cxcywh
from deformable_family.modeling.criterion import SetCriterion
from deformable_family.modeling.matcher import HungarianMatcher
from deformable_family.modeling.postprocessing import detr_inference, postprocess_to_original

from .transformer import DeformableDecoder, DeformableEncoder, DeformableTransformer, refine_boxes

__all__ = ["DeformableDETR"]


def _class_head(d_model: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    head = nn.Linear(d_model, num_classes)
    # Focal-loss prior: every class starts at probability prior_prob (RetinaNet, Sec. 4.1).
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def _first_rows(head: nn.Linear, num_rows: int) -> nn.Linear:
    """A deep copy of ``head`` keeping only its first ``num_rows`` outputs."""
    copied = copy.deepcopy(head)
    if num_rows != head.out_features:
        copied.weight = nn.Parameter(head.weight.detach()[:num_rows].clone())
        copied.bias = nn.Parameter(head.bias.detach()[:num_rows].clone())
        copied.out_features = num_rows
    return copied


def _box_head(d_model: int, size_bias: float) -> MLP:
    head = MLP(d_model, d_model, 4, 3)
    nn.init.constant_(head.layers[-1].weight, 0.0)
    nn.init.constant_(head.layers[-1].bias, 0.0)
    # Authors' code: the (w, h) logits may start below 0 so initial boxes are small.
    nn.init.constant_(head.layers[-1].bias[2:], size_bias)
    return head


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """Backbone -> multi-scale deformable transformer -> per-layer class and box heads.

    Heads are owned here only: ``class_embed`` / ``bbox_embed`` hold one head per decoder layer with
    iterative refinement, else a single head applied to every layer (the authors repeat one module,
    so its parameters count once). Two-stage adds ``proposal_class_embed`` / ``proposal_bbox_embed``
    on the encoder output. The heads reach the transformer as call arguments.

    Built from a LazyConfig (``configs/common/models/deformable_detr.py``) or, as a registered
    detectron2 meta-architecture, by ``build_model(cfg)`` from a yacs config prepared with
    ``deformable_family.config.add_deformable_detr_config`` (see :meth:`from_config`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: DeformableTransformer,
        criterion: nn.Module,
        num_classes: int = 80,
        num_queries: int = 300,
        with_box_refine: bool = False,
        two_stage: bool = False,
        proposal_num_classes: int = 1,
        aux_loss: bool = True,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
        select_topk: int = 100,
    ):
        """
        Args:
            backbone: returns a dict of L maps (B, d_model, H_l, W_l) in increasing stride, e.g.
                :class:`MultiScaleResNet`; its ``output_shape()`` must list L levels of d_model channels.
            position_embedding: mask (B, H, W) -> (B, d_model, H, W), e.g. :class:`PositionEmbeddingSine`.
            transformer: :class:`DeformableTransformer` with the same d_model, L and two_stage.
            criterion: ``criterion(outputs, targets)`` -> dict of weighted losses (``SetCriterion``).
            num_classes: foreground classes (80 for detectron2's COCO; 91 in the authors' checkpoints).
            num_queries: decoder queries (learned embeddings, or top-k proposals for two-stage).
            with_box_refine: one class/box head per decoder layer, each layer refining the boxes of the
                previous one.
            two_stage: queries from encoder proposals; requires ``with_box_refine``.
            proposal_num_classes: width of the two-stage proposal class head. Only its first logit
                (foreground) is used and trained to be positive; 1 is a binary head. The authors keep
                a num_classes-wide head (91 rows): set 91 to reproduce their parameter count.
            aux_loss: supervise every decoder layer (``aux_outputs``).
            pixel_mean, pixel_std: per-channel normalisation in ``input_format`` order, 0-255 scale.
            input_format: channel order of ``batched_inputs[i]["image"]`` ("RGB" or "BGR"); the
                backbone gets RGB as torchvision's ImageNet weights expect.
            select_topk: detections kept per image at inference.
        """
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError(
                "two_stage=True requires with_box_refine=True (two-stage implies refinement)"
            )
        if transformer.two_stage != two_stage:
            raise ValueError(
                f"transformer.two_stage ({transformer.two_stage}) differs from two_stage ({two_stage})"
            )
        if two_stage and not 1 <= proposal_num_classes <= num_classes:
            raise ValueError(
                f"proposal_num_classes must be in [1, num_classes={num_classes}], got {proposal_num_classes}"
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
                f"backbone gives {len(backbone_levels)} levels but transformer.num_levels is {transformer.num_levels}"
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
                f"position_embedding gives {pos_channels} channels (2 * num_pos_feats) but d_model is {d_model}"
            )
        if two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(
                f"transformer.two_stage_num_proposals ({transformer.two_stage_num_proposals}) must equal "
                f"num_queries ({num_queries})"
            )

        self.backbone = backbone
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.aux_loss = aux_loss
        self.input_format = input_format
        self.select_topk = select_topk
        if not two_stage:
            # (Q, 2 * d): positional half, then content half.
            self.query_embed = nn.Embedding(num_queries, d_model * 2)

        num_decoder_layers = transformer.decoder.num_layers
        # As the authors: one class head and one box head are built and initialised, and every
        # per-layer head (refinement) and the two-stage proposal heads are deep copies of them, so
        # all start from identical weights.
        class_head = _class_head(d_model, num_classes)
        box_head = _box_head(d_model, size_bias=0.0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(
                copy.deepcopy(class_head) for _ in range(num_decoder_layers)
            )
            self.bbox_embed = nn.ModuleList(
                copy.deepcopy(box_head) for _ in range(num_decoder_layers)
            )
            # Only the first layer's box head starts with small (w, h); the two-stage model keeps
            # 0 for every box head, as the authors' code resets them.
            if not two_stage:
                nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_head])
            self.bbox_embed = nn.ModuleList([box_head])
        if two_stage:
            # The authors' proposal heads are one more copy of each head; a narrower proposal class
            # head keeps the copy's first rows (only row 0, the foreground logit, is used).
            self.proposal_class_embed = _first_rows(class_head, proposal_num_classes)
            self.proposal_bbox_embed = copy.deepcopy(box_head)

        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """The constructor's arguments from a yacs config (``MODEL.DEFORMABLE_DETR`` and the
        backbone's keys, see ``deformable_family.config``); the parts are built in the order the
        LazyConfig builds them, so the same seed gives the same initial weights."""
        if "DEFORMABLE_DETR" not in cfg.MODEL:
            raise KeyError(
                "cfg.MODEL.DEFORMABLE_DETR is missing: call "
                "deformable_family.config.add_deformable_detr_config(cfg) first"
            )
        config = cfg.MODEL.DEFORMABLE_DETR
        backbone = build_backbone(cfg)
        d_model = config.HIDDEN_DIM
        num_levels = len(backbone.output_shape())
        position_embedding = PositionEmbeddingSine(
            num_channels=d_model, temperature=config.POSITION_TEMPERATURE, normalize=True
        )
        layer_sizes = dict(
            d_model=d_model,
            d_ffn=config.DIM_FEEDFORWARD,
            dropout=config.DROPOUT,
            n_levels=num_levels,
            n_heads=config.NHEADS,
        )
        encoder = DeformableEncoder(
            num_layers=config.ENC_LAYERS,
            n_points=config.ENC_N_POINTS,
            attn_backend=config.ENC_ATTN_BACKEND,
            **layer_sizes,
        )
        decoder = DeformableDecoder(
            num_layers=config.DEC_LAYERS,
            n_points=config.DEC_N_POINTS,
            attn_backend=config.DEC_ATTN_BACKEND,
            **layer_sizes,
        )
        transformer = DeformableTransformer(
            encoder=encoder,
            decoder=decoder,
            d_model=d_model,
            num_levels=num_levels,
            two_stage=config.TWO_STAGE,
            two_stage_num_proposals=config.NUM_QUERIES,
        )
        criterion = SetCriterion(
            num_classes=config.NUM_CLASSES,
            matcher=HungarianMatcher(
                cost_class=config.COST_CLASS,
                cost_bbox=config.COST_BBOX,
                cost_giou=config.COST_GIOU,
                focal_alpha=config.FOCAL_ALPHA,
                focal_gamma=config.FOCAL_GAMMA,
            ),
            weight_dict={
                "loss_class": config.CLASS_WEIGHT,
                "loss_bbox": config.BBOX_WEIGHT,
                "loss_giou": config.GIOU_WEIGHT,
            },
            focal_alpha=config.FOCAL_ALPHA,
            focal_gamma=config.FOCAL_GAMMA,
        )
        return {
            "backbone": backbone,
            "position_embedding": position_embedding,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": config.NUM_CLASSES,
            "num_queries": config.NUM_QUERIES,
            "with_box_refine": config.WITH_BOX_REFINE,
            "two_stage": config.TWO_STAGE,
            "proposal_num_classes": config.PROPOSAL_NUM_CLASSES or config.NUM_CLASSES,
            "aux_loss": config.AUX_LOSS,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "input_format": cfg.INPUT.FORMAT,
            "select_topk": config.SELECT_TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _head(self, heads: nn.ModuleList, layer: int) -> nn.Module:
        return heads[layer] if self.with_box_refine else heads[0]

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalise, pad to a common size and build the padding mask.

        Returns:
            images: ImageList (B, 3, H, W) in RGB order; mask: (B, H, W) bool, True on padding.
        """
        images = []
        for index, item in enumerate(batched_inputs):
            if "image" not in item:
                raise ValueError(f"batched_inputs[{index}] has no 'image' field")
            image = item["image"]
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"batched_inputs[{index}]['image'] must be a (3, H, W) tensor, got "
                    f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
                )
            image = (image.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
            if self.input_format == "BGR":
                image = image.flip(0)
            images.append(image)
        images = ImageList.from_tensors(images)
        mask = torch.ones(
            images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.bool, device=self.device
        )
        for index, (height, width) in enumerate(images.image_sizes):
            mask[index, :height, :width] = False
        return images, mask

    def prepare_targets(
        self, batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]
    ) -> List[Dict]:
        """gt_boxes (xyxy absolute) -> boxes (cxcywh normalised by the unpadded image size)."""
        targets = []
        for index, (item, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
            if "instances" not in item:
                raise ValueError(f"batched_inputs[{index}] has no 'instances' field in training")
            instances = item["instances"].to(self.device)
            scale = torch.tensor(
                [width, height, width, height], dtype=torch.float32, device=self.device
            )
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
            targets.append({"labels": instances.gt_classes.long(), "boxes": boxes})
        return targets

    def run_transformer(
        self, features: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor]
    ) -> Dict[str, Any]:
        """The transformer on per-level features (B, d, H_l, W_l), padding masks (B, H_l, W_l) and
        position embeddings, with this model's queries and heads (heads live here, not in the decoder)."""
        return self.transformer(
            features,
            masks,
            pos_embeds,
            query_embed=None if self.two_stage else self.query_embed.weight,
            box_heads=self.bbox_embed if self.with_box_refine else None,
            proposal_class_head=self.proposal_class_embed if self.two_stage else None,
            proposal_box_head=self.proposal_bbox_embed if self.two_stage else None,
        )

    def forward_outputs(self, images: torch.Tensor, mask: torch.Tensor) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True on padding.

        Returns:
            {"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) normalised cxcywh, "aux_outputs": [...]
            for decoder layers 0..D-2 when aux_loss, "enc_outputs": {...} (B, S, ...) for two-stage}.
        """
        features = list(self.backbone(images).values())
        masks = [
            F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in features
        ]
        pos_embeds = [self.position_embedding(m).to(f.dtype) for m, f in zip(masks, features)]
        num_decoder_layers = self.transformer.decoder.num_layers
        transformer_outputs = self.run_transformer(features, masks, pos_embeds)
        hidden_states = transformer_outputs["hidden_states"]
        references = transformer_outputs["references"]
        layer_outputs = []
        for layer in range(num_decoder_layers):
            logits = self._head(self.class_embed, layer)(hidden_states[layer])
            boxes = refine_boxes(
                self._head(self.bbox_embed, layer)(hidden_states[layer]), references[layer]
            )
            layer_outputs.append({"pred_logits": logits, "pred_boxes": boxes})
        outputs = dict(layer_outputs[-1])
        if self.aux_loss:
            outputs["aux_outputs"] = layer_outputs[:-1]
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": transformer_outputs["enc_logits"],
                "pred_boxes": transformer_outputs["enc_boxes"],
            }
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 format, each {"image": (3, H, W) in ``input_format``,
                "instances": Instances with gt_boxes (xyxy absolute) and gt_classes (training only),
                optional "height", "width" (output size)}.

        Returns:
            training: dict of weighted losses; inference: list of {"instances": Instances} with
            pred_boxes (xyxy in the output size), scores, pred_classes.
        """
        images, mask = self.preprocess_image(batched_inputs)
        outputs = self.forward_outputs(images.tensor, mask)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.criterion(outputs, targets)
        results = detr_inference(
            outputs["pred_logits"],
            outputs["pred_boxes"],
            images.image_sizes,
            num_topk=self.select_topk,
        )
        return postprocess_to_original(results, batched_inputs, images.image_sizes)
