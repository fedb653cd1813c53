from .param_groups import param_groups_by_name

__all__ = ["param_groups_by_name"]
