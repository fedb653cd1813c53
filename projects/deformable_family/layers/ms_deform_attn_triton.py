"""Multi-scale deformable sampling in Triton: forward and backward kernels and their autograd.

The same operation as :func:`deformable_family.layers.ms_deform_attn` (Deformable DETR, Eq. 3):
bilinear sampling with ``align_corners=False`` and zero padding, a corner outside its map, a sample on
an empty level (H or W = 0) and a non-finite location read nothing, and every gradient through such a
sample is zero.

Layout of the kernels (written for the GPU):

* one program per (block of ``BLOCK_Q`` queries, batch element, head), on a 1-D grid with the query
  blocks of one (batch, head) adjacent, so neighbouring programs gather from the same value rows;
* the ``D`` channels of a head are one vector of the program (a ``BLOCK_Q x BLOCK_D`` tile), so each
  corner gather reads ``D`` contiguous values and the bilinear weights of a sample are computed once
  per sample, not per channel;
* float32 accumulation for every input dtype (float32, float16, bfloat16); float32 locations and
  weights are accepted with a 16-bit value;
* backward: each program writes the location and weight gradients of its own samples (reductions over
  the channel vector, no atomics) and scatters the value gradient with ``tl.atomic_add`` into a float32
  buffer. The order of those additions varies on a GPU, so the value gradient is not bit-reproducible
  there (as with the CUDA kernel).

On CUDA tensors the kernels run compiled. On CPU tensors they run only in Triton's interpreter, which
triton 3.x selects in ``triton.jit``, i.e. when the kernels are defined: the environment variable
``TRITON_INTERPRET=1`` must be set before the first use of this path in the process (the kernels live
in :mod:`.ms_deform_attn_triton_kernels`, imported then, so importing the package does not import
triton). The tests run the kernels this way, every line of them, on the CPU. Without it, CPU tensors
get an error pointing at :func:`ms_deform_attn`, whose compiled CPU kernel is the CPU path.
"""

import contextlib
import functools
import importlib
import warnings
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from .ms_deform_attn_op import check_ms_deform_attn_inputs

__all__ = ["ms_deform_attn_triton", "triton_interpreted"]

# Elements of a program's (queries x channels) tile; BLOCK_Q = tile / BLOCK_D. Compiled for sm_90
# without a GPU (triton 3.8, 4 warps, head_dim a multiple of 16), these tiles need about 72
# registers per thread in both kernels, without spills; twice the tiles needed about 140. Not tuned
# by timing: no GPU was available.
_FORWARD_TILE = 1024
_BACKWARD_TILE = 512
_MAX_BLOCK_Q = 64


@functools.lru_cache(maxsize=None)
def _kernels() -> ModuleType:
    """The kernel module, imported (and its kernels defined, compiled or interpreted) on first use."""
    try:
        return importlib.import_module(".ms_deform_attn_triton_kernels", __package__)
    except ImportError as e:  # torch builds without CUDA (e.g. macOS) do not ship triton
        raise RuntimeError(
            f"ms_deform_attn_triton: triton cannot be imported ({e}); use "
            "deformable_family.layers.ms_deform_attn (the compiled CPU and CUDA kernels)"
        ) from e


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's interpreter in this process, i.e. whether
    ``TRITON_INTERPRET=1`` was set when they were defined (at the first use of the Triton path, or
    at this call if it is the first). Raises RuntimeError when triton is not installed."""
    kernels = _kernels()
    return not isinstance(kernels.ms_deform_attn_forward_kernel, kernels.triton.runtime.JITFunction)


def _check_runnable(device: torch.device) -> None:
    if device.type == "cuda" or triton_interpreted():
        return
    raise RuntimeError(
        f"ms_deform_attn_triton: the inputs are {device.type} tensors; the Triton kernels run on CUDA "
        "tensors, or on CPU tensors in Triton's interpreter (a testing aid, slow), which needs "
        "TRITON_INTERPRET=1 in the environment before the first use of the Triton path in the process. "
        "For CPU tensors use deformable_family.layers.ms_deform_attn (the compiled CPU kernel)."
    )


def _alert_not_deterministic() -> None:
    """What torch's own non-deterministic CUDA ops do under ``torch.use_deterministic_algorithms``:
    raise, or warn with ``warn_only=True``."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "ms_deform_attn_triton backward does not have a deterministic implementation (the value "
        "gradient is accumulated with atomic adds), but torch.use_deterministic_algorithms(True) is "
        "set; the CPU kernel of ms_deform_attn is deterministic"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (they may be on another GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_shape(num_queries: int, head_dim: int, tile: int) -> Tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_D, number of query blocks): the head's channels are one power-of-two vector,
    as many queries as fill the tile."""
    block_d = 1 << max(head_dim - 1, 0).bit_length()
    block_q = max(1, min(_MAX_BLOCK_Q, tile // block_d))
    return block_q, block_d, -(-num_queries // block_q)


def _forward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> torch.Tensor:
    batch, num_rows, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # Every element is written by the kernel (zero where a query reads nothing).
    output = value.new_empty((batch, num_queries, num_heads, head_dim))
    if output.numel() == 0:
        return output.view(batch, num_queries, num_heads * head_dim)
    block_q, block_d, num_query_blocks = _launch_shape(num_queries, head_dim, _FORWARD_TILE)
    grid = (num_query_blocks * batch * num_heads,)
    with _on_device(value.device):
        _kernels().ms_deform_attn_forward_kernel[grid](
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            output,
            num_rows,
            num_queries,
            num_heads,
            num_levels,
            num_points,
            head_dim,
            num_query_blocks,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
        )
    return output.view(batch, num_queries, num_heads * head_dim)


def _backward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_rows, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # float32 buffer for the atomic adds: 16-bit atomics would round at every addition.
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    # Zero-initialised for the cases without a launch (no channel: every gradient is zero).
    grad_locations = torch.zeros_like(sampling_locations)
    grad_weights = torch.zeros_like(attention_weights)
    if batch * num_queries * num_heads * head_dim > 0:
        if not triton_interpreted():  # the interpreter runs the programs one after another
            _alert_not_deterministic()
        block_q, block_d, num_query_blocks = _launch_shape(num_queries, head_dim, _BACKWARD_TILE)
        grid = (num_query_blocks * batch * num_heads,)
        with _on_device(value.device):
            _kernels().ms_deform_attn_backward_kernel[grid](
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
                grad_output,
                grad_value,
                grad_locations,
                grad_weights,
                num_rows,
                num_queries,
                num_heads,
                num_levels,
                num_points,
                head_dim,
                num_query_blocks,
                BLOCK_Q=block_q,
                BLOCK_D=block_d,
            )
    return grad_value.to(value.dtype), grad_locations, grad_weights


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        inputs = tuple(
            t.contiguous()
            for t in (
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
            )
        )
        ctx.save_for_backward(*inputs)
        return _forward(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = _backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
        )
        return grad_value, None, None, grad_locations, grad_weights


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """Multi-scale deformable sampling with the Triton kernels; the arguments, the result and the
    semantics are those of :func:`deformable_family.layers.ms_deform_attn`, with the same validation.

    Args:
        value: (N, S, M, D) float32, float16 or bfloat16, S = sum of H_l * W_l.
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64, first row of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y).
        attention_weights: (N, Lq, M, L, P).
        spatial_shapes_list: optional, keyword only: spatial_shapes as L (H, W) pairs of Python ints;
            with it the level sizes are validated without reading a tensor on the GPU (see
            :func:`ms_deform_attn`); the kernels themselves never read outside value either way.

    Returns:
        (N, Lq, M * D) in value's dtype, accumulated in float32. Differentiable in value,
        sampling_locations and attention_weights (not twice).

    Raises:
        TypeError, ValueError: as :func:`ms_deform_attn` for inputs that do not fit together; TypeError
            for float64 (the kernels accumulate in float32).
        RuntimeError: for CPU tensors unless Triton's interpreter is on (``TRITON_INTERPRET=1`` before
            the first use, see the module docstring), or when triton is not installed.
    """
    check_ms_deform_attn_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        spatial_shapes_list=spatial_shapes_list,
    )
    if value.dtype == torch.float64:
        # tl.atomic_add and the float32 accumulator would silently lose float64's precision.
        raise TypeError(
            "ms_deform_attn_triton: value is float64, which the Triton kernels do not support (they "
            "accumulate in float32); use deformable_family.layers.ms_deform_attn for float64"
        )
    _check_runnable(value.device)
    return _MSDeformAttnTriton.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
