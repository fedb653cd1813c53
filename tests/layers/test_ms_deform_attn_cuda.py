"""The CUDA kernel of ms_deform_attn against the reference, and what only a GPU can show: the
non-determinism alert, no host synchronisation, CUDA graph capture, device checks in C++. Runs only
when a GPU is visible and the extension was built with CUDA (FORCE_CUDA=1 or on a GPU machine);
skips with the reason otherwise."""
import pytest
import torch

from deformable_family.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_reference
from deformable_family.layers.ms_deform_attn_op import compiled_kernels

if __package__:
    from .test_ms_deform_attn import CASES, LEVELS, TOLERANCE, forward_and_grads, make_inputs, relative_error
    from .test_ms_deform_attn import _empty_level_case, _nan_guarded
else:
    from test_ms_deform_attn import CASES, LEVELS, TOLERANCE, forward_and_grads, make_inputs, relative_error
    from test_ms_deform_attn import _empty_level_case, _nan_guarded

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


def test_mixed_devices_raise_in_cpp():
    """The op called directly (no Python checks): the C++ device check answers."""
    value, spatial_shapes, level_start_index, locations, weights = _to_cuda(make_inputs(1, LEVELS[1], 2, 4, 3, 2))
    with pytest.raises(ValueError, match="attention_weights is on cpu"):
        torch.ops.deformable_family.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights.cpu())


def test_backward_alerts_non_determinism():
    """grad_value is accumulated with atomicAdd: deterministic mode raises, warn_only warns, as
    PyTorch's own atomicAdd kernels do. The forward is deterministic and allowed."""
    inputs = _to_cuda(make_inputs(1, LEVELS[1], 2, 4, 3, 2, dtype=torch.float32, seed=26))
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        value = inputs[0].clone().requires_grad_()
        output = ms_deform_attn(value, *inputs[1:])
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            output.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_cuda"):
            ms_deform_attn(value, *inputs[1:]).sum().backward()
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


@pytest.mark.parametrize("empty_position", [0, 1, 2])
def test_empty_levels_read_zero(empty_position):
    inputs = _to_cuda(_empty_level_case(empty_position, (2, 0), dtype=torch.float32))
    cpu64 = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs)
    expected = forward_and_grads(ms_deform_attn_reference, cpu64)
    actual = forward_and_grads(ms_deform_attn, inputs)
    for a, e in zip(actual, expected):
        assert relative_error(a.cpu().double(), e) <= TOLERANCE[torch.float32]


def test_no_read_leaves_value():
    """value inside a nan-filled buffer, empty levels first and last, the issue's locations 0.5."""
    clean, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, [(0, 3), (1, 1), (3, 4), (4, 0)], 2, 5, 6, 3, dtype=torch.float32, seed=27
    )
    guarded, _ = _nan_guarded(clean.cuda())
    locations[:, :, :, :, 0] = 0.5
    inputs = (guarded, spatial_shapes.cuda(), level_start_index.cuda(), locations.cuda(), weights.cuda())
    actual = forward_and_grads(ms_deform_attn, inputs)
    expected = forward_and_grads(ms_deform_attn_reference, (clean, spatial_shapes, level_start_index, locations, weights))
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        assert relative_error(a.cpu().double(), e.double()) <= TOLERANCE[torch.float32]


def test_level_tensors_that_disagree_with_value_are_never_read_outside_it():
    """The C++ checks do not read CUDA level tensors (that would synchronise): a direct call with a
    level description that overruns value must still read nothing outside it."""
    clean, spatial_shapes, level_start_index, locations, weights = make_inputs(
        1, [(3, 4), (2, 2)], 2, 4, 5, 2, dtype=torch.float32, seed=28
    )
    guarded, _ = _nan_guarded(clean.cuda())
    for shapes, starts in (([[3, 4], [9, 9]], [0, 12]), ([[3, 4], [2, 2]], [0, 14]), ([[3, 4], [2, 2]], [-5, 12])):
        output = torch.ops.deformable_family.ms_deform_attn(
            guarded, torch.tensor(shapes).cuda(), torch.tensor(starts).cuda(), locations.cuda(), weights.cuda()
        )
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_dtypes_match_reference(value_dtype):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        2, LEVELS[4], 2, 32, 7, 4, dtype=torch.float32, seed=29
    )
    mixed = _to_cuda((value.to(value_dtype), spatial_shapes, level_start_index, locations, weights))
    actual = forward_and_grads(ms_deform_attn, mixed, grad_output_dtype=value_dtype)
    exact = tuple(t.cpu().double() if t.is_floating_point() else t.cpu() for t in mixed)
    expected = forward_and_grads(ms_deform_attn_reference, exact, grad_output_dtype=value_dtype)
    for a, e, dtype in zip(actual, expected, (value_dtype, value_dtype, torch.float32, torch.float32)):
        assert a.dtype == dtype
        assert relative_error(a.cpu().double(), e) <= (2e-2 if value_dtype == torch.bfloat16 else 2e-3)


def _attention_inputs(batch=2, num_queries=6):
    torch.manual_seed(30)
    module = MSDeformAttn(d_model=32, n_levels=4, n_heads=2, n_points=4).cuda()
    levels = LEVELS[4]
    spatial_shapes = torch.tensor(levels, device="cuda")
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_rows = sum(h * w for h, w in levels)
    query = torch.randn(batch, num_queries, 32, device="cuda")
    reference_points = torch.rand(batch, num_queries, 4, 2, device="cuda")
    value = torch.randn(batch, num_rows, 32, device="cuda")
    return module, (query, reference_points, value, spatial_shapes, level_start_index), levels


def test_no_host_synchronisation_in_msdeformattn():
    module, inputs, levels = _attention_inputs()
    module(*inputs, spatial_shapes_list=levels)  # warm-up (lazy initialisations may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = module(*inputs, spatial_shapes_list=levels)
        output.sum().backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = module(*inputs, spatial_shapes_list=levels)
        output.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture_and_replay():
    module, inputs, levels = _attention_inputs()
    with torch.no_grad():
        expected = module(*inputs, spatial_shapes_list=levels)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
            module(*inputs, spatial_shapes_list=levels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(*inputs, spatial_shapes_list=levels)
        inputs[2].mul_(2)  # new values in the captured input
        graph.replay()
        torch.testing.assert_close(captured, module(*inputs, spatial_shapes_list=levels))
        assert not torch.allclose(captured, expected)


def test_compile_reduce_overhead():
    module, inputs, levels = _attention_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # recorded into a CUDA graph after warm-up runs
            output = compiled(*inputs, spatial_shapes_list=levels)
        torch.testing.assert_close(output, module(*inputs, spatial_shapes_list=levels), rtol=1e-4, atol=1e-4)
