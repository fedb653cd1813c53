"""Converters of released weights to this package's parameter names."""

from .deformable_detr import (
    OfficialVariant,
    check_fits_model,
    config_name_for,
    convert_official_state_dict,
    detect_variant,
)

__all__ = [
    "OfficialVariant",
    "check_fits_model",
    "config_name_for",
    "convert_official_state_dict",
    "detect_variant",
]
