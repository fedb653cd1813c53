"""Multi-scale ResNet of Deformable DETR: C3-C5 through 1x1 conv + GroupNorm, plus C6 from C5. No FPN.

The same module serves AdaMixer / StageInteractor (C2-C5, one GroupNorm shared by all levels,
BatchNorm in eval mode with trainable affine parameters) through keyword arguments.
"""

from typing import Dict, List, Sequence

import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicStem, ResNet

_STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class MultiScaleResNet(Backbone):
    """detectron2's ResNet (``self.body``) followed by the input projections (``self.input_proj``).

    Level i of the output is ``GroupNorm(Conv1x1(C_i))`` for each stage in ``in_features``; each extra
    level is ``GroupNorm(Conv3x3 stride 2)`` of the previous one (the first extra one reads the last
    ResNet stage, e.g. C5 -> C6 at stride 64). Outputs are named ``p<log2(stride)>``. With
    ``neck_norm=""`` the GroupNorms are left out (SMCA-DETR's plain convolutions with bias).

    Parameter names follow the optimiser's groups: ``body.*`` (reduced lr) and ``input_proj.*``
    (full lr, as in the authors' recipe).
    """

    def __init__(
        self,
        depth: int = 50,
        in_features: Sequence[str] = ("res3", "res4", "res5"),
        num_extra_levels: int = 1,
        out_channels: int = 256,
        num_groups: int = 32,
        freeze_at: int = 2,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = False,
        shared_norm: bool = False,
        norm_eval: bool = False,
        neck_norm: str = "GN",
        neck_init: str = "xavier",
    ):
        """
        Args:
            depth: ResNet depth, one of 18, 34, 50, 101.
            in_features: ResNet stages fed to the neck, in increasing stride ("res3".."res5").
                ``("res5",)`` with ``num_extra_levels=0`` is the single-scale model.
            num_extra_levels: levels added by stride-2 3x3 convs on top of the last stage.
            out_channels: channels of every output level (the transformer's d_model).
            num_groups: GroupNorm groups of the neck.
            freeze_at: 2 freezes the stem and res2, as the authors (only res3-res5 train).
            norm: ResNet norm; "FrozenBN" keeps ImageNet statistics as buffers.
            stride_in_1x1: False puts the stride on the 3x3 conv, as torchvision's weights expect.
            shared_norm: one GroupNorm module (``self.shared_norm``) applied to every level after its
                conv, instead of one GroupNorm per level: the neck of AdaMixer / StageInteractor
                (mmdetection's ChannelMapping with ``gn_out``).
            norm_eval: mmdetection's ``norm_eval=True`` with ``frozen_stages``: every BatchNorm of the
                ResNet stays in eval mode during training (running statistics never updated) while
                the affine parameters of the stages after ``freeze_at`` still train; the frozen
                stages keep their BatchNorm modules with ``requires_grad=False`` instead of being
                converted to FrozenBN, so their weights count as (frozen) parameters, as in the
                AdaMixer / StageInteractor authors' models. Requires ``norm="BN"`` or ``"SyncBN"``.
            neck_norm: "GN" puts a GroupNorm after each neck conv (Deformable DETR); "" none
                (DETR, SMCA-DETR). Index 0 of each ``input_proj`` entry is the conv either way.
            neck_init: "xavier" initialises the neck convs with xavier_uniform weights and zero bias
                (Deformable DETR); "default" keeps PyTorch's Conv2d initialisation (DETR, SMCA-DETR).
        """
        super().__init__()
        if depth not in (18, 34, 50, 101):
            raise ValueError(f"depth must be one of 18, 34, 50, 101, got {depth}")
        in_features = list(in_features)
        unknown = [name for name in in_features if name not in _STAGE_STRIDES]
        if not in_features or unknown:
            raise ValueError(
                f"in_features must name stages among {list(_STAGE_STRIDES)}, got {in_features}"
            )
        if sorted(in_features, key=_STAGE_STRIDES.get) != in_features:
            raise ValueError(f"in_features must be in increasing stride order, got {in_features}")
        if num_extra_levels < 0:
            raise ValueError(f"num_extra_levels must be >= 0, got {num_extra_levels}")
        if norm_eval and norm not in ("BN", "SyncBN"):
            raise ValueError(
                f"norm_eval=True keeps BatchNorm layers in eval mode: norm must be 'BN' or 'SyncBN', "
                f"got {norm!r} (FrozenBN is already fixed)"
            )
        if neck_norm not in ("GN", ""):
            raise ValueError(f"neck_norm must be 'GN' or '' (no norm), got {neck_norm!r}")
        if neck_init not in ("xavier", "default"):
            raise ValueError(f"neck_init must be 'xavier' or 'default', got {neck_init!r}")

        stage_kwargs = {"norm": norm}
        if depth >= 50:
            stage_kwargs["stride_in_1x1"] = stride_in_1x1
        stem = BasicStem(in_channels=3, out_channels=64, norm=norm)
        stages = ResNet.make_default_stages(depth, **stage_kwargs)
        self.norm_eval = norm_eval
        if norm_eval:
            # detectron2's freeze converts BatchNorm to FrozenBN (affine as buffers); mmdetection
            # only stops the gradients, so the frozen weights stay parameters.
            self.body = ResNet(stem, stages, out_features=in_features, freeze_at=0)
            _freeze_keeping_norms(self.body, freeze_at)
        else:
            self.body = ResNet(stem, stages, out_features=in_features, freeze_at=freeze_at)
        self.in_features = in_features
        body_shapes = self.body.output_shape()

        def level_norm() -> List[nn.Module]:
            return [] if shared_norm else [nn.GroupNorm(num_groups, out_channels)]

        projections: List[nn.Module] = []
        for name in in_features:
            projections.append(
                nn.Sequential(
                    nn.Conv2d(body_shapes[name].channels, out_channels, kernel_size=1),
                    *level_norm(),
                )
            )
        in_channels = body_shapes[in_features[-1]].channels
        for _ in range(num_extra_levels):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1),
                    *level_norm(),
                )
            )
            in_channels = out_channels
        if neck_norm == "":
            projections = [nn.Sequential(projection[0]) for projection in projections]
        self.input_proj = nn.ModuleList(projections)
        self.shared_norm = nn.GroupNorm(num_groups, out_channels) if shared_norm else None
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)
        if neck_init == "default":
            for projection in self.input_proj:
                projection[0].reset_parameters()

        strides = [_STAGE_STRIDES[name] for name in in_features]
        strides += [strides[-1] * 2 ** (i + 1) for i in range(num_extra_levels)]
        self._out_features = [f"p{stride.bit_length() - 1}" for stride in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {name: out_channels for name in self._out_features}

    def train(self, mode: bool = True) -> "MultiScaleResNet":
        super().train(mode)
        if self.norm_eval:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @property
    def num_levels(self) -> int:
        return len(self._out_features)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            {"p3": (B, out_channels, H/8, W/8), ..., "p6": (B, out_channels, H/64, W/64)}, in
            increasing stride (rounded up at each stride-2 step).
        """
        stage_outputs = self.body(images)
        outputs: List[torch.Tensor] = [
            self._normalise(projection(stage_outputs[name]))
            for projection, name in zip(self.input_proj, self.in_features)
        ]
        previous = stage_outputs[self.in_features[-1]]
        for projection in self.input_proj[len(self.in_features) :]:
            previous = self._normalise(projection(previous))
            outputs.append(previous)
        return dict(zip(self._out_features, outputs))

    def _normalise(self, feature: torch.Tensor) -> torch.Tensor:
        return feature if self.shared_norm is None else self.shared_norm(feature)


def _freeze_keeping_norms(body: ResNet, freeze_at: int) -> None:
    """Stop the gradients of the stem (freeze_at >= 1) and of res2..res{freeze_at}, keeping their
    modules (BatchNorm included) as they are: mmdetection's ``frozen_stages = freeze_at - 1``."""
    frozen = [body.stem] if freeze_at >= 1 else []
    frozen += [
        getattr(body, f"res{index}")
        for index in range(2, freeze_at + 1)
        if hasattr(body, f"res{index}")
    ]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


@BACKBONE_REGISTRY.register()
def build_multiscale_resnet_backbone(cfg, input_shape: ShapeSpec) -> MultiScaleResNet:
    """yacs entry point: ``MODEL.RESNETS.{DEPTH, OUT_FEATURES, NORM, STRIDE_IN_1X1}``,
    ``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.MULTISCALE_RESNET.{NUM_EXTRA_LEVELS, OUT_CHANNELS,
    NUM_GROUPS}``, added by ``deformable_family.config.add_multiscale_resnet_config`` (or
    ``add_deformable_detr_config``) with the LazyConfig's defaults. detectron2's own default of
    ``STRIDE_IN_1X1`` (True, Caffe2 weights) is the opposite of this backbone's, so a config
    without those keys is refused rather than built differently.
    """
    if input_shape.channels != 3:
        raise ValueError(
            f"input_shape.channels must be 3 (RGB/BGR images), got {input_shape.channels}"
        )
    if "MULTISCALE_RESNET" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.MULTISCALE_RESNET is missing: call "
            "deformable_family.config.add_deformable_detr_config(cfg) (or add_multiscale_resnet_config) "
            "before setting the config, so that the backbone's defaults are those of the LazyConfig"
        )
    return MultiScaleResNet(
        depth=cfg.MODEL.RESNETS.DEPTH,
        in_features=list(cfg.MODEL.RESNETS.OUT_FEATURES),
        num_extra_levels=cfg.MODEL.MULTISCALE_RESNET.NUM_EXTRA_LEVELS,
        out_channels=cfg.MODEL.MULTISCALE_RESNET.OUT_CHANNELS,
        num_groups=cfg.MODEL.MULTISCALE_RESNET.NUM_GROUPS,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=cfg.MODEL.RESNETS.NORM,
        stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
    )
