"""detectron2 yacs configuration of the family's registered parts, for ``build_model(cfg)``.

The LazyConfigs in ``configs/`` are the main route; this one serves code built on detectron2's
``get_cfg()`` / ``DefaultTrainer``::

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from deformable_family.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)  # the defaults of configs/common/models/deformable_detr.py
    cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE = True
    model = build_model(cfg)  # DeformableDETR with MultiScaleResNet

With the defaults, both routes build the same model (same modules, sizes and initialisation; a
test compares them). detectron2's own defaults that differ from the LazyConfig are overwritten:
``MODEL.RESNETS.STRIDE_IN_1X1`` (torchvision weights put the stride in the 3x3 conv),
``MODEL.RESNETS.OUT_FEATURES``, ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` (RGB, ImageNet statistics
on the 0-255 scale), ``INPUT.FORMAT`` ("RGB"), ``MODEL.META_ARCHITECTURE`` and
``MODEL.BACKBONE.NAME``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_deformable_detr_config", "add_multiscale_resnet_config"]


def add_multiscale_resnet_config(cfg: CN) -> None:
    """Keys of ``build_multiscale_resnet_backbone`` (with ``MODEL.RESNETS.{DEPTH, OUT_FEATURES,
    NORM, STRIDE_IN_1X1}`` and ``MODEL.BACKBONE.FREEZE_AT`` of detectron2)."""
    cfg.MODEL.BACKBONE.NAME = "build_multiscale_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem and res2 frozen, as the authors
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision-style ResNet weights
    cfg.MODEL.MULTISCALE_RESNET = CN()
    # Levels added by stride-2 3x3 convs after the last stage (1: C6, the authors' 4th level; 0
    # with OUT_FEATURES ["res5"] for the single-scale model).
    cfg.MODEL.MULTISCALE_RESNET.NUM_EXTRA_LEVELS = 1
    cfg.MODEL.MULTISCALE_RESNET.OUT_CHANNELS = 256  # must equal the detector's hidden dim
    cfg.MODEL.MULTISCALE_RESNET.NUM_GROUPS = 32


def add_deformable_detr_config(cfg: CN) -> None:
    """Add ``MODEL.DEFORMABLE_DETR`` (and the backbone's keys) to a detectron2 config, with the
    defaults of ``configs/common/models/deformable_detr.py``, and select ``DeformableDETR``.

    Sizes that must agree are not interpolated in yacs: change
    ``MODEL.MULTISCALE_RESNET.OUT_CHANNELS`` with ``MODEL.DEFORMABLE_DETR.HIDDEN_DIM`` (the model
    says so if they differ). The number of feature levels is the backbone's.
    """
    add_multiscale_resnet_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"

    cfg.MODEL.DEFORMABLE_DETR = CN()
    _C = cfg.MODEL.DEFORMABLE_DETR
    _C.NUM_CLASSES = 80
    _C.NUM_QUERIES = 300
    _C.WITH_BOX_REFINE = False
    _C.TWO_STAGE = False
    _C.PROPOSAL_NUM_CLASSES = 0  # 0: NUM_CLASSES, as the authors (1: a binary proposal head)
    _C.AUX_LOSS = True
    _C.SELECT_TOPK = 100  # detections kept per image at inference

    # Transformer
    _C.HIDDEN_DIM = 256
    _C.ENC_LAYERS = 6
    _C.DEC_LAYERS = 6
    _C.DIM_FEEDFORWARD = 1024
    _C.DROPOUT = 0.1
    _C.NHEADS = 8
    _C.ENC_N_POINTS = 4
    _C.DEC_N_POINTS = 4
    # The sampling op's implementation per stage: "extension" (compiled CPU/CUDA) or "triton" (CUDA).
    _C.ENC_ATTN_BACKEND = "extension"
    _C.DEC_ATTN_BACKEND = "extension"
    _C.POSITION_TEMPERATURE = 10000.0

    # Loss weights and matching costs (focal class, L1 and GIoU box terms)
    _C.CLASS_WEIGHT = 2.0
    _C.BBOX_WEIGHT = 5.0
    _C.GIOU_WEIGHT = 2.0
    _C.COST_CLASS = 2.0
    _C.COST_BBOX = 5.0
    _C.COST_GIOU = 2.0
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0
