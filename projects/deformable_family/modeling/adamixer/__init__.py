"""AdaMixer and StageInteractor: query-based detectors with adaptive 3D sampling and mixing."""
from .adamixer import AdaMixer
from .mixing import AdaptiveMixing, CascadeMixing
from .query_boxes import (
    iof_attention_bias,
    refine_xyzr,
    whole_image_xyzr,
    xyzr_position_embedding,
    xyzr_to_xyxy,
)
from .sampling import (
    AdaptiveSampler3D,
    CoarseFineSampler,
    FeatureLevels,
    flatten_levels,
    level_weights,
    sample_3d,
)
from .stage import DecoderStage, StageOutput, adamixer_stages, stageinteractor_stages

__all__ = [
    "AdaMixer",
    "AdaptiveMixing",
    "AdaptiveSampler3D",
    "CascadeMixing",
    "CoarseFineSampler",
    "DecoderStage",
    "FeatureLevels",
    "StageOutput",
    "adamixer_stages",
    "flatten_levels",
    "iof_attention_bias",
    "level_weights",
    "refine_xyzr",
    "sample_3d",
    "stageinteractor_stages",
    "whole_image_xyzr",
    "xyzr_position_embedding",
    "xyzr_to_xyxy",
]
