"""The CUDA kernel of ms_deform_attn against the reference. Runs only when a GPU is visible and the
extension was built with CUDA (FORCE_CUDA=1 or on a GPU machine); skips with the reason otherwise."""
import pytest
import torch

from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference
from deformable_family.layers.ms_deform_attn_op import compiled_kernels

if __package__:
    from .test_ms_deform_attn import CASES, LEVELS, TOLERANCE, forward_and_grads, make_inputs, relative_error
else:
    from test_ms_deform_attn import CASES, LEVELS, TOLERANCE, forward_and_grads, make_inputs, relative_error

if not torch.cuda.is_available():
    pytest.skip("no GPU visible: the CUDA kernel of ms_deform_attn cannot run here", allow_module_level=True)
if "cuda" not in compiled_kernels():
    pytest.skip(
        "deformable_family._C was built without CUDA: rebuild with FORCE_CUDA=1 to test the CUDA kernel",
        allow_module_level=True,
    )


def _to_cuda(inputs):
    return tuple(t.cuda() for t in inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim,num_levels,num_points", CASES)
def test_matches_reference(head_dim, num_levels, num_points, dtype):
    seed = head_dim * 100 + num_levels * 10 + num_points
    inputs = _to_cuda(make_inputs(2, LEVELS[num_levels], 2, head_dim, 5, num_points, dtype=dtype, seed=seed))
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    # The reference on CPU in float64 is the most trustworthy comparison.
    cpu64 = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs)
    expected = forward_and_grads(ms_deform_attn_reference, cpu64)
    actual = forward_and_grads(ms_deform_attn, inputs)
    for name, a, e in zip(names, actual, expected):
        assert a.is_cuda and a.dtype == dtype, name
        error = relative_error(a.cpu().double(), e)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_types_close_to_float32(dtype):
    inputs = _to_cuda(make_inputs(2, LEVELS[4], 2, 32, 7, 4, dtype=torch.float32, seed=21))
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    rounded = tuple(t.float() if t.is_floating_point() else t for t in low)
    actual = forward_and_grads(ms_deform_attn, low, grad_output_dtype=dtype)
    expected = forward_and_grads(ms_deform_attn, rounded, grad_output_dtype=dtype)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        assert relative_error(a.float(), e) <= tolerance


def test_non_finite_locations_read_nothing():
    inputs = _to_cuda(make_inputs(1, LEVELS[4], 2, 8, 4, 4, dtype=torch.float32, seed=22))
    value, spatial_shapes, level_start_index, locations, weights = inputs
    poisoned = locations.clone()
    poisoned[..., 0, :] = torch.tensor([float("nan"), 1e30], device="cuda")
    poisoned[..., 1, :] = torch.tensor([-float("inf"), -3e9], device="cuda")
    zeroed = weights.clone()
    zeroed[..., :2] = 0
    actual = forward_and_grads(ms_deform_attn, (value, spatial_shapes, level_start_index, poisoned, weights))
    expected = forward_and_grads(ms_deform_attn, (value, spatial_shapes, level_start_index, locations, zeroed))
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1])
    assert torch.all(actual[2][..., :2, :] == 0) and torch.all(actual[3][..., :2] == 0)


def test_empty_and_non_contiguous_inputs():
    value, spatial_shapes, level_start_index, locations, weights = _to_cuda(
        make_inputs(0, LEVELS[1], 2, 4, 3, 2, seed=23)
    )
    assert ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights).shape == (0, 3, 8)
    inputs = _to_cuda(make_inputs(2, LEVELS[4], 3, 5, 4, 2, seed=24))
    value, spatial_shapes, level_start_index, locations, weights = inputs
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    torch.testing.assert_close(
        ms_deform_attn(value_nc, spatial_shapes, level_start_index, locations, weights),
        ms_deform_attn(*inputs),
        rtol=0,
        atol=0,
    )


def test_gradcheck_float64():
    inputs = _to_cuda(make_inputs(1, [(3, 4), (2, 2)], 2, 3, 2, 2, seed=25, margin=0.0))
    value, spatial_shapes, level_start_index, locations, weights = inputs
    shape = spatial_shapes.flip(-1).double()[None, None, None, :, None, :]
    pixel = locations * shape - 0.5
    locations = ((pixel.floor() + 0.25 + 0.5 * (pixel - pixel.floor())) + 0.5) / shape  # away from kinks

    def op(v, loc, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, loc, w)

    args = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    # nondet_tol: grad_value is accumulated with atomicAdd, in a varying order.
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)


def test_mixed_devices_raise():
    value, spatial_shapes, level_start_index, locations, weights = _to_cuda(make_inputs(1, LEVELS[1], 2, 4, 3, 2))
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, spatial_shapes.cpu(), level_start_index, locations, weights)
