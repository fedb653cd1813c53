"""Cross-check on a GPU: the compiled CUDA kernel of ms_deform_attn against the Triton kernels (which
CI verifies on the CPU in Triton's interpreter), both against the float64 reference.

The first thing to run when a GPU is available:

    FORCE_CUDA=1 python setup.py build_ext --inplace
    python -m pytest tests/layers/test_ms_deform_attn_triton_cuda.py tests/layers/test_ms_deform_attn_cuda.py

Skips with the reason without a GPU, without the CUDA kernel, without triton, or when Triton's
interpreter is on (it would run the Triton side on the CPU).
"""

import pytest
import torch

from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_triton
from deformable_family.layers.ms_deform_attn_op import compiled_kernels
from deformable_family.layers.ms_deform_attn_triton import triton_interpreted

if __package__:
    from .test_ms_deform_attn import CASES, LEVELS, forward_and_grads, make_inputs, relative_error
else:
    from test_ms_deform_attn import CASES, LEVELS, forward_and_grads, make_inputs, relative_error

if not torch.cuda.is_available():
    pytest.skip(
        "no GPU visible: the CUDA and Triton kernels cannot be compared here",
        allow_module_level=True,
    )
if "cuda" not in compiled_kernels():
    pytest.skip(
        "deformable_family._C was built without CUDA: rebuild with FORCE_CUDA=1 to compare the kernels",
        allow_module_level=True,
    )
try:
    if triton_interpreted():
        pytest.skip(
            "TRITON_INTERPRET=1: the Triton kernels would run interpreted", allow_module_level=True
        )
except RuntimeError as e:  # triton is not installed
    pytest.skip(str(e), allow_module_level=True)

NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
# Both kernels accumulate in float32, in different orders (and the value gradient with atomics).
FLOAT32_TOLERANCE = 1e-4
HALF_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _cuda(inputs, dtype=None):
    return tuple(
        t.to(device="cuda", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        for t in inputs
    )


def _extension(*args):
    return ms_deform_attn(*args, backend="extension")


def compare_kernels(inputs, tolerance, grad_output_dtype=None):
    """CUDA kernel and Triton kernels on the same CUDA inputs: each against the float64 reference on
    the CPU (so a failure names the wrong one), and against each other."""
    cpu64 = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs)
    expected = forward_and_grads(
        ms_deform_attn_reference, cpu64, grad_output_dtype=grad_output_dtype
    )
    cuda = forward_and_grads(_extension, inputs, grad_output_dtype=grad_output_dtype)
    triton = forward_and_grads(ms_deform_attn_triton, inputs, grad_output_dtype=grad_output_dtype)
    errors = []
    for name, c, t, e in zip(NAMES, cuda, triton, expected):
        assert c.is_cuda and t.is_cuda and c.dtype == t.dtype, name
        cuda_error = relative_error(c.cpu().double(), e)
        triton_error = relative_error(t.cpu().double(), e)
        between = relative_error(t.cpu().double(), c.cpu().double())
        if max(cuda_error, triton_error) > tolerance or between > 2 * tolerance:
            errors.append(
                f"{name}: CUDA {cuda_error:.3g}, Triton {triton_error:.3g}, between {between:.3g}"
            )
    assert not errors, "; ".join(errors)


@pytest.mark.parametrize("head_dim,num_levels,num_points", CASES)
def test_float32_kernels_agree(head_dim, num_levels, num_points):
    seed = head_dim * 100 + num_levels * 10 + num_points
    inputs = make_inputs(
        2, LEVELS[num_levels], 2, head_dim, 5, num_points, dtype=torch.float32, seed=seed
    )
    compare_kernels(_cuda(inputs), FLOAT32_TOLERANCE)


def test_float32_kernels_agree_at_encoder_scale():
    """Many programs and heavy atomic traffic: Deformable DETR's encoder at 400 x 533, batch 2."""
    level_shapes = [(50, 67), (25, 34), (13, 17), (7, 9)]
    num_queries = sum(h * w for h, w in level_shapes)
    inputs = make_inputs(
        2, level_shapes, 8, 32, num_queries, 4, dtype=torch.float32, seed=41, margin=0.05
    )
    compare_kernels(_cuda(inputs), FLOAT32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_kernels_agree(dtype):
    inputs = make_inputs(2, LEVELS[4], 2, 32, 7, 4, dtype=torch.float32, seed=42)
    compare_kernels(_cuda(inputs, dtype), HALF_TOLERANCE[dtype], grad_output_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_value_with_float32_locations_and_weights(dtype):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, LEVELS[4], 2, 32, 7, 4, dtype=torch.float32, seed=43
    )
    inputs = _cuda((value.to(dtype), spatial_shapes, level_start_index, locations, weights))
    compare_kernels(inputs, HALF_TOLERANCE[dtype], grad_output_dtype=dtype)


def test_empty_levels_and_non_finite_locations_agree():
    level_shapes = [(4, 5), (0, 3), (2, 2), (3, 0), (1, 1)]
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, level_shapes, 2, 9, 6, 3, dtype=torch.float32, seed=44
    )
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -3e9, 2.0, -0.5])
    locations[:, :, :, :, 0] = bad[torch.arange(locations[:, :, :, :, 0].numel()) % len(bad)].view(
        locations[:, :, :, :, 0].shape
    )
    inputs = _cuda((value, spatial_shapes, level_start_index, locations, weights))
    cuda = forward_and_grads(_extension, inputs)
    triton = forward_and_grads(ms_deform_attn_triton, inputs)
    for name, c, t in zip(NAMES, cuda, triton):
        assert torch.isfinite(c).all() and torch.isfinite(t).all(), name
        assert relative_error(t.double(), c.double()) <= FLOAT32_TOLERANCE, name
    assert torch.all(triton[2][:, :, :, [1, 3]] == 0) and torch.all(triton[3][:, :, :, [1, 3]] == 0)
