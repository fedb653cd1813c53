from .deformable_detr import DeformableDETR
from .transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    DeformableTransformer,
)

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DeformableDecoder",
    "DeformableDecoderLayer",
]
