"""Multi-scale deformable sampling: the compiled op, its autograd and its fake implementation.

The kernels live in ``kernels/`` and are registered by the extension ``deformable_family._C`` as
``torch.ops.deformable_family.ms_deform_attn`` and ``torch.ops.deformable_family.ms_deform_attn_backward``.
This module adds what torch.compile and torch.export need (a fake implementation of both ops) and
the autograd formula, and exposes :func:`ms_deform_attn`, which falls back to the pure-PyTorch
reference (warning once) when the extension or the kernel for the tensors' device is missing.
"""
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .ms_deform_attn_reference import ms_deform_attn_reference

try:
    from deformable_family import _C
except ImportError as e:  # the extension was not built
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = e
else:
    _IMPORT_ERROR = None

__all__ = ["ms_deform_attn", "compiled_kernels", "check_ms_deform_attn_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned_fallback = set()
# Queried once: a constant that torch.compile can trace through (a pybind call would break the graph).
_COMPILED_KERNELS: Tuple[str, ...] = () if _C is None else ("cpu", "cuda") if _C.compiled_with_cuda() else ("cpu",)


def compiled_kernels() -> List[str]:
    """Devices with a compiled ``ms_deform_attn`` kernel in this build, e.g. ``["cpu", "cuda"]``;
    ``[]`` when the extension ``deformable_family._C`` is missing."""
    return list(_COMPILED_KERNELS)


def _shape(tensor: torch.Tensor) -> Tuple[int, ...]:
    return tuple(tensor.shape)


def _check_are_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    for name, tensor in (
        ("value", value),
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_ms_deform_attn_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    check_levels: bool = True,
) -> None:
    """Raises TypeError or ValueError naming the argument at fault when the inputs of
    :func:`ms_deform_attn` do not fit together (shapes in its docstring).

    Args:
        check_levels: also check that spatial_shapes and level_start_index describe exactly the S
            rows of value. This reads their values (a device-to-host copy for CUDA tensors) and is
            skipped where values are unknown (fake tensors while tracing); the compiled op always
            performs it in C++ before any kernel runs.
    """
    _check_are_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ms_deform_attn: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.dtype != value.dtype:
            raise TypeError(
                f"ms_deform_attn: {name} has dtype {tensor.dtype} but value has dtype {value.dtype}; they must match"
            )
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {tensor.dtype}")
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.device != value.device:
            raise ValueError(
                f"ms_deform_attn: {name} is on {tensor.device} but value is on {value.device}; "
                "all inputs must be on the same device"
            )

    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {_shape(value)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be (L, 2), got shape {_shape(spatial_shapes)}")
    batch, num_rows, num_heads, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({num_levels},) as spatial_shapes "
            f"{_shape(spatial_shapes)}, got shape {_shape(level_start_index)}"
        )
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != num_heads
        or sampling_locations.shape[3] != num_levels
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2) with N={batch}, M={num_heads} "
            f"(from value {_shape(value)}) and L={num_levels} (from spatial_shapes {_shape(spatial_shapes)}), "
            f"got shape {_shape(sampling_locations)}"
        )
    expected_weights = sampling_locations.shape[:5]
    if attention_weights.shape != expected_weights:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {tuple(expected_weights)} to match "
            f"sampling_locations {_shape(sampling_locations)}, got shape {_shape(attention_weights)}"
        )
    if check_levels:
        _check_levels(spatial_shapes.tolist(), level_start_index.tolist(), num_rows, _shape(value))


def _check_levels(
    spatial_shapes: Sequence[Sequence[int]], level_start_index: Sequence[int], num_rows: int, value_shape
) -> None:
    expected_start = 0
    for level, ((height, width), start) in enumerate(zip(spatial_shapes, level_start_index)):
        if height < 0 or width < 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{level}] = ({height}, {width}) must not be negative")
        if start != expected_start:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] = {start} is inconsistent with spatial_shapes: "
                f"expected {expected_start} (the sum of H*W over the earlier levels)"
            )
        expected_start += height * width
    if expected_start != num_rows:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes describe sum(H*W) = {expected_start} rows but value has "
            f"S = {num_rows} (value shape {tuple(value_shape)})"
        )


def _warn_fallback_once(reason: str) -> None:
    if reason not in _warned_fallback:
        _warned_fallback.add(reason)
        warnings.warn(
            f"deformable_family: {reason}; ms_deform_attn falls back to ms_deform_attn_reference "
            "(pure PyTorch grid_sample: slower and more memory). Build the kernels with the "
            "documented set-up, `bash tools/setup_env.sh` (FORCE_CUDA=1 for CUDA; "
            "DF_USE_ACTIVE_ENV=1 for the active environment), which installs this package with "
            "its extension.",
            RuntimeWarning,
            stacklevel=3,
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable sampling (Deformable DETR, Eq. 3): for each query and head, the sum
    over levels and points of attention weight times the bilinearly sampled value.

    Runs the compiled kernel for the tensors' device; when the extension (or its kernel for that
    device) is missing, warns once and runs :func:`ms_deform_attn_reference`.

    Args:
        value: (N, S, M, D) float, S = sum of H_l * W_l, levels flattened row-major in level order.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level, on value's device.
        level_start_index: (L,) int64, first row of each level in S, on value's device.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y): (0, 0) is the top-left corner of the
            top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel.
        attention_weights: (N, Lq, M, L, P); need not sum to one.

    Returns:
        (N, Lq, M * D). Bilinear sampling with zero padding (``grid_sample``, ``align_corners=False``):
        a corner outside a map, and a non-finite location, contribute zero. Float32 under autocast
        (the inputs are cast to float32 first), else the dtype of the inputs.
    """
    _check_are_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device_type = value.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the inputs arrive in mixed precision (a float16 value projection, float32
        # softmax weights). Like grid_sample, which autocast runs in float32, the op then computes
        # in float32; outside autocast mixed dtypes are an error.
        value, sampling_locations, attention_weights = (
            t.float() if t.is_floating_point() else t for t in (value, sampling_locations, attention_weights)
        )
    check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, check_levels=False
    )
    if device_type in _COMPILED_KERNELS:
        # Level values are checked in C++, once, right before the kernel runs.
        return torch.ops.deformable_family.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if _C is None:
        _warn_fallback_once(f"the extension deformable_family._C is not available ({_IMPORT_ERROR})")
    else:
        _warn_fallback_once(f"deformable_family._C was built without a {device_type} kernel")
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _register_fake_and_autograd() -> None:
    """Fake implementations (shapes only, for torch.compile / torch.export) and the autograd formula
    of the C++ ops. The backward op has no derivative itself: double backward is not supported."""

    @torch.library.register_fake("deformable_family::ms_deform_attn")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        check_ms_deform_attn_inputs(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, check_levels=False
        )
        batch, _, num_heads, head_dim = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], num_heads * head_dim))

    @torch.library.register_fake("deformable_family::ms_deform_attn_backward")
    def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.deformable_family.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("deformable_family::ms_deform_attn", _backward, setup_context=_setup_context)


if _C is not None:
    _register_fake_and_autograd()
