"""Converters of released weights to this package's parameter names."""

from .deformable_detr import (
    OfficialVariant,
    check_fits_model,
    config_name_for,
    convert_official_state_dict,
    detect_variant,
)
from .dsct import (
    DSCTVariant,
    convert_official_dsct_state_dict,
    detect_dsct_variant,
    dsct_config_name_for,
    load_official_checkpoint,
)
from .smca_detr import (
    OfficialSMCAVariant,
    convert_official_smca_state_dict,
    detect_smca_variant,
    smca_config_name_for,
    smca_structure_overrides,
)

__all__ = [
    "DSCTVariant",
    "convert_official_dsct_state_dict",
    "detect_dsct_variant",
    "dsct_config_name_for",
    "load_official_checkpoint",
    "OfficialVariant",
    "check_fits_model",
    "config_name_for",
    "convert_official_state_dict",
    "detect_variant",
    "OfficialSMCAVariant",
    "convert_official_smca_state_dict",
    "detect_smca_variant",
    "smca_config_name_for",
    "smca_structure_overrides",
]
