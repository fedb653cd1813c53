"""PLACEHOLDER until the compiled op lands: dispatches to the reference. Owned by the op work."""
from .ms_deform_attn_reference import ms_deform_attn_reference


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
