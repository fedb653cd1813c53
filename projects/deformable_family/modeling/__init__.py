"""Backbones, matcher, losses, criterion and meta-architectures of the family.

Importing this package registers the backbones and meta-architectures in detectron2's registries.
"""
from .backbones import MultiScaleResNet, build_multiscale_resnet_backbone
from .deformable_detr import DeformableDETR
from .dsct import DSCT
from .adamixer import AdaMixer
from .smca_detr import SMCADETR
