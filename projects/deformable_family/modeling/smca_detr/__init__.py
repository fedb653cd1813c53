from .smca_detr import SMCADETR, boxes_from_centres
from .transformer import (
    ConvMultiScaleEncoder,
    ConvMultiScaleEncoderLayer,
    ReleasedMultiScaleTransformer,
    SMCADecoder,
    SMCADecoderLayer,
    SMCAEncoder,
    SMCAEncoderLayer,
    SMCATransformer,
)

__all__ = [
    "SMCADETR",
    "boxes_from_centres",
    "SMCATransformer",
    "ReleasedMultiScaleTransformer",
    "SMCAEncoder",
    "SMCAEncoderLayer",
    "ConvMultiScaleEncoder",
    "ConvMultiScaleEncoderLayer",
    "SMCADecoder",
    "SMCADecoderLayer",
]
