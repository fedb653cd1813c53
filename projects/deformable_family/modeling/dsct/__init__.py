from .dsct import DSCT, subject_instances
from .ssra import SpatialSemanticRelationalAggregation, ssra

__all__ = ["DSCT", "SpatialSemanticRelationalAggregation", "ssra", "subject_instances"]
