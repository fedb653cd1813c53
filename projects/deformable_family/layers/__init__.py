from .ms_deform_attn_op import ms_deform_attn
from .ms_deform_attn_reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]
