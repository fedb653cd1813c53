"""Multi-scale deformable sampling: the compiled op, its autograd and its fake implementation.

The kernels live in ``kernels/`` and are registered by the extension ``deformable_family._C`` as
``torch.ops.deformable_family.ms_deform_attn`` and ``torch.ops.deformable_family.ms_deform_attn_backward``.
This module adds what torch.compile and torch.export need (a fake implementation of both ops) and
the autograd formula, and exposes :func:`ms_deform_attn`, which falls back to the pure-PyTorch
reference (warning once) when the extension or the kernel for the tensors' device is missing.

No call reads a device tensor on the host when the caller passes ``spatial_shapes_list`` (the level
sizes as Python ints, which :class:`MSDeformAttn` and the transformers do): the level description is
validated on those ints, so a call neither synchronises with the GPU nor breaks CUDA graph capture.
"""
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .ms_deform_attn_reference import ms_deform_attn_reference

try:
    from deformable_family import _C
except ImportError as e:  # the extension was not built
    _C = None
    _IMPORT_ERROR: Optional[ImportError] = e
else:
    _IMPORT_ERROR = None

__all__ = [
    "ms_deform_attn",
    "compiled_kernels",
    "check_ms_deform_attn_inputs",
    "ATTN_BACKENDS",
    "check_attn_backend",
]

# Implementations of the op: "extension", the kernels of deformable_family._C (C++ on CPU, CUDA on
# GPU; the default); "triton", those of ms_deform_attn_triton (CUDA tensors; CPU tensors only in
# Triton's interpreter).
ATTN_BACKENDS = ("extension", "triton")

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_16_BIT_DTYPES = (torch.float16, torch.bfloat16)
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


def _check_coordinate_dtype(value: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Locations and weights have value's dtype, or float32 with a 16-bit value (a float32 location
    keeps its precision: in bfloat16 a location near 1.0 is quantised to about half a pixel on a
    134-pixel-wide level)."""
    if tensor.dtype == value.dtype or (value.dtype in _16_BIT_DTYPES and tensor.dtype == torch.float32):
        return
    allowed = f"{value.dtype} or torch.float32" if value.dtype in _16_BIT_DTYPES else f"{value.dtype}"
    raise TypeError(f"ms_deform_attn: {name} has dtype {tensor.dtype} but value has dtype {value.dtype}; it must be {allowed}")


def check_ms_deform_attn_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    check_levels: bool = True,
    *,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
) -> None:
    """Raises TypeError or ValueError naming the argument at fault when the inputs of
    :func:`ms_deform_attn` do not fit together (shapes and dtypes in its docstring). Every
    implementation of the op (compiled kernels, reference, others) validates with this function.

    Args:
        check_levels: also check that the level description (spatial_shapes, level_start_index)
            covers exactly the S rows of value. With ``spatial_shapes_list`` this uses those host ints
            and reads no tensor on a GPU. Without it the tensors are read: free on the CPU; on another
            device one device-to-host copy (a synchronisation) the first time a pair of level tensors
            is seen, remembered while neither tensor is modified. Skipped where values cannot be read:
            while torch.compile or torch.export traces, and while a CUDA graph is being captured.
        spatial_shapes_list: the values of ``spatial_shapes`` as L pairs of Python ints ``(H_l, W_l)``,
            which the caller guarantees equal the tensor (compared with it only on the CPU, where that
            is free). level_start_index is then trusted to be their cumulative sum.
    """
    _check_are_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ms_deform_attn: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    _check_coordinate_dtype(value, sampling_locations, "sampling_locations")
    _check_coordinate_dtype(value, attention_weights, "attention_weights")
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
    on_cpu = spatial_shapes.device.type == "cpu"
    if spatial_shapes_list is not None:
        levels = _as_level_list(spatial_shapes_list, num_levels)
        _check_levels(levels, None, num_rows, _shape(value), name="spatial_shapes_list")
        # On the CPU the comparison is free; elsewhere it would be the copy the list exists to avoid.
        if on_cpu and _can_read_values() and spatial_shapes.tolist() != [list(level) for level in levels]:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes_list {levels} differs from spatial_shapes {spatial_shapes.tolist()}"
            )
    if check_levels and (spatial_shapes_list is None or on_cpu) and _can_read_values():
        _check_level_tensors(spatial_shapes, level_start_index, num_rows, _shape(value), remember=not on_cpu)


def _as_level_list(spatial_shapes_list, num_levels: int) -> List[Tuple[int, int]]:
    """spatial_shapes_list as L (H, W) pairs of ints (SymInts while torch.compile traces with dynamic
    shapes); TypeError / ValueError naming it otherwise."""
    if isinstance(spatial_shapes_list, torch.Tensor) or not isinstance(spatial_shapes_list, (list, tuple)):
        raise TypeError(
            "ms_deform_attn: spatial_shapes_list must be a list of (H, W) Python ints (host values, so that "
            f"no device tensor is read), got {type(spatial_shapes_list).__name__}"
        )
    levels = []
    for level in spatial_shapes_list:
        if (
            not isinstance(level, (list, tuple))
            or len(level) != 2
            or not all(isinstance(size, (int, torch.SymInt)) and not isinstance(size, bool) for size in level)
        ):
            raise TypeError(f"ms_deform_attn: spatial_shapes_list must hold (H, W) pairs of Python ints, got {level!r}")
        levels.append((level[0], level[1]))
    if len(levels) != num_levels:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes_list has {len(levels)} levels but spatial_shapes has L = {num_levels}"
        )
    return levels


def _can_read_values() -> bool:
    """Whether tensor values can be read now: not while torch.compile / torch.export trace (fake
    tensors), and not while a CUDA graph is captured (a device-to-host copy is not capturable)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# Level tensors on a device already checked: id pair -> (weak references, version counters, S). An
# entry holds while both tensors are alive and unmodified, so each distinct pair costs one copy.
_checked_level_tensors: Dict[Tuple[int, int], Tuple[weakref.ref, weakref.ref, int, int, int]] = {}
_MAX_CHECKED_LEVEL_TENSORS = 64


def _read_level_values(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor):
    """The level tensors' values as lists: one device-to-host copy for tensors on a device."""
    values = torch.cat([spatial_shapes.reshape(-1), level_start_index]).tolist()
    num_levels = level_start_index.shape[0]
    return [values[2 * level : 2 * level + 2] for level in range(num_levels)], values[2 * num_levels :]


def _check_level_tensors(spatial_shapes, level_start_index, num_rows: int, value_shape, remember: bool) -> None:
    """Checks the level tensors' values; with remember, a pair already checked (same objects, not
    modified since, same S) is not read again."""
    if not remember:
        shapes, starts = _read_level_values(spatial_shapes, level_start_index)
        _check_levels(shapes, starts, num_rows, value_shape)
        return
    key = (id(spatial_shapes), id(level_start_index))
    try:  # inference tensors have no version counter: those are checked on every call
        versions: Optional[Tuple[int, int]] = (spatial_shapes._version, level_start_index._version)
    except RuntimeError:
        versions = None
    entry = _checked_level_tensors.get(key)
    if (
        entry is not None
        and versions is not None
        and entry[0]() is spatial_shapes
        and entry[1]() is level_start_index
        and entry[2:] == (*versions, num_rows)
    ):
        return
    shapes, starts = _read_level_values(spatial_shapes, level_start_index)
    _check_levels(shapes, starts, num_rows, value_shape)
    if versions is not None:
        if len(_checked_level_tensors) >= _MAX_CHECKED_LEVEL_TENSORS:
            _checked_level_tensors.clear()
        _checked_level_tensors[key] = (weakref.ref(spatial_shapes), weakref.ref(level_start_index), *versions, num_rows)


def _check_levels(
    spatial_shapes: Sequence[Sequence[int]],
    level_start_index: Optional[Sequence[int]],
    num_rows: int,
    value_shape,
    name: str = "spatial_shapes",
) -> None:
    """spatial_shapes: L (H, W) pairs, level_start_index: L ints or None (then not checked)."""
    expected_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        if height < 0 or width < 0:
            raise ValueError(f"ms_deform_attn: {name}[{level}] = ({height}, {width}) must not be negative")
        if level_start_index is not None and level_start_index[level] != expected_start:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] = {level_start_index[level]} is inconsistent with "
                f"spatial_shapes: expected {expected_start} (the sum of H*W over the earlier levels)"
            )
        expected_start += height * width
    if expected_start != num_rows:
        raise ValueError(
            f"ms_deform_attn: {name} describe sum(H*W) = {expected_start} rows but value has "
            f"S = {num_rows} (value shape {tuple(value_shape)})"
        )


def check_attn_backend(backend: str, name: str = "ms_deform_attn: backend") -> None:
    """Raises ValueError naming ``name`` when ``backend`` is not one of :data:`ATTN_BACKENDS`."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"{name} must be one of {ATTN_BACKENDS}, got {backend!r}")


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
    *,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    backend: str = "extension",
) -> torch.Tensor:
    """Multi-scale deformable sampling (Deformable DETR, Eq. 3): for each query and head, the sum
    over levels and points of attention weight times the bilinearly sampled value.

    Runs the compiled kernel for the tensors' device; when the extension (or its kernel for that
    device) is missing, warns once and runs :func:`ms_deform_attn_reference`. With
    ``backend="triton"`` it runs :func:`ms_deform_attn_triton` instead (same semantics).

    Args:
        value: (N, S, M, D) float32, float64, float16 or bfloat16; S = sum of H_l * W_l, levels
            flattened row-major in level order.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level, on value's device. A level may be empty
            (H_l or W_l = 0): its samples read zero, as outside the map.
        level_start_index: (L,) int64, first row of each level in S, on value's device.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y): (0, 0) is the top-left corner of the
            top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel. value's dtype, or
            float32 with a 16-bit value (read in float32: no quantisation of the location).
        attention_weights: (N, Lq, M, L, P); need not sum to one. Same dtype rule as the locations.
        spatial_shapes_list: optional, keyword only: the values of ``spatial_shapes`` as L pairs of
            Python ints. With it no tensor is read on the host (no device-to-host copy, no GPU
            synchronisation, CUDA-graph capturable); without it the level tensors of a GPU call are
            copied to the host once per distinct pair for validation.
        backend: ``"extension"`` (the compiled kernels, default) or ``"triton"`` (CUDA tensors; CPU
            tensors only in Triton's interpreter, ``TRITON_INTERPRET=1``).

    Returns:
        (N, Lq, M * D) in value's dtype. Bilinear sampling with zero padding (``grid_sample``,
        ``align_corners=False``): a corner outside a map, a non-finite location and an empty level
        contribute zero. Arithmetic in float32 for 16-bit values. Under autocast, 16-bit locations and
        weights are first cast to float32; value keeps its dtype.
    """
    _check_are_tensors(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_attn_backend(backend)
    device_type = value.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # Under autocast the value projection arrives in 16 bits and the locations may too: the
        # kernels read locations and weights in float32 (exact for 16-bit inputs) and keep the 16-bit
        # value, accumulating in float32.
        sampling_locations, attention_weights = (
            t.float() if t.dtype in _16_BIT_DTYPES else t for t in (sampling_locations, attention_weights)
        )
    if backend == "triton":
        from .ms_deform_attn_triton import ms_deform_attn_triton  # imports this module

        return ms_deform_attn_triton(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            spatial_shapes_list=spatial_shapes_list,
        )
    use_kernel = device_type in _COMPILED_KERNELS
    # The C++ checks read the level tensors where that is free (on the CPU): no need to read them here.
    check_ms_deform_attn_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        check_levels=not (use_kernel and device_type == "cpu"),
        spatial_shapes_list=spatial_shapes_list,
    )
    if use_kernel:
        return torch.ops.deformable_family.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if _C is None:
        _warn_fallback_once(f"the extension deformable_family._C is not available ({_IMPORT_ERROR})")
    else:
        _warn_fallback_once(f"deformable_family._C was built without a {device_type} kernel")
    return ms_deform_attn_reference(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        spatial_shapes_list=spatial_shapes_list,
    )


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
