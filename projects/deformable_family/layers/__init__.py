from .ms_deform_attn_op import ms_deform_attn
from .ms_deform_attn_reference import ms_deform_attn_reference
from .ms_deform_attn_triton import ms_deform_attn_triton
from .deformable_attention import MSDeformAttn
from .dropout import Dropout
from .mlp import MLP
from .position_encoding import PositionEmbeddingSine, sine_embedding
from .spatially_modulated_attention import SpatiallyModulatedCoAttention

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_triton",
    "MSDeformAttn",
    "Dropout",
    "MLP",
    "PositionEmbeddingSine",
    "sine_embedding",
    "SpatiallyModulatedCoAttention",
]
