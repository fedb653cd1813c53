"""Tests of the deformable-sampling op on CPU: kernel against the reference, gradients,
out-of-map and non-finite locations, empty levels and reads confined to value, mixed dtypes,
validation (also from host ints), determinism, empty inputs, the fallback.

The CPU kernel tests need the compiled extension; they skip with the reason when it is missing.
The helpers at the top are imported by test_ms_deform_attn_compile.py and test_ms_deform_attn_cuda.py.
"""
import itertools
import warnings
from typing import Sequence, Tuple

import pytest
import torch

from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference
from deformable_family.layers import ms_deform_attn_op
from deformable_family.layers.ms_deform_attn_op import compiled_kernels


def level_tensors(level_shapes: Sequence[Tuple[int, int]], device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes (L, 2) and level_start_index (L,) for the given (H, W) levels."""
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def make_inputs(
    batch: int,
    level_shapes: Sequence[Tuple[int, int]],
    num_heads: int,
    head_dim: int,
    num_queries: int,
    num_points: int,
    dtype=torch.float64,
    device="cpu",
    seed: int = 0,
    margin: float = 0.3,
):
    """Random inputs; locations are uniform in [-margin, 1 + margin], so with margin > 0 some samples
    fall (partly or wholly) outside their map."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(level_shapes, device)
    num_rows = int(sum(h * w for h, w in level_shapes))
    num_levels = len(level_shapes)
    value = torch.randn(batch, num_rows, num_heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, num_queries, num_heads, num_levels, num_points, 2, generator=generator, dtype=dtype)
    locations = locations * (1 + 2 * margin) - margin
    weights = torch.rand(batch, num_queries, num_heads, num_levels, num_points, generator=generator, dtype=dtype)
    return (
        value.to(device),
        spatial_shapes,
        level_start_index,
        locations.to(device),
        weights.to(device),
    )


def naive_bilinear(value_level: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Bilinear sample of one (H, W, D) map at normalised (x, y), written out corner by corner:
    pixel centres at ((i + 0.5) / W, (j + 0.5) / H), zero outside. Returns (D,)."""
    height, width, _ = value_level.shape
    px, py = x * width - 0.5, y * height - 0.5
    out = torch.zeros(value_level.shape[-1], dtype=value_level.dtype)
    if not (-1 < px < width and -1 < py < height):
        return out
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < height and 0 <= xi < width:
                out += wy * wx * value_level[yi, xi]
    return out


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(|expected|), the error relative to the tensor's scale."""
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


requires_cpu_kernel = pytest.mark.skipif(
    "cpu" not in compiled_kernels(), reason="deformable_family._C (the compiled CPU kernel) is not built"
)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def forward_and_grads(op, inputs, grad_output_seed: int = 1, grad_output_dtype=None):
    """Runs op on fresh leaf copies of inputs; returns (output, grad_value, grad_locations, grad_weights).
    grad_output is random (seeded), drawn in float64 and rounded to grad_output_dtype if given."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # detach(), not clone(): the leaves keep the inputs' memory (a non-contiguous layout, a value
    # inside a nan-guarded buffer), which is what the kernel must then read.
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    generator = torch.Generator().manual_seed(grad_output_seed)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    if grad_output_dtype is not None:
        grad_output = grad_output.to(grad_output_dtype)
    grad_output = grad_output.to(device=output.device, dtype=output.dtype)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return (output.detach(),) + tuple(grads)


def assert_matches_reference(inputs, tolerance: float):
    names = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    actual = forward_and_grads(ms_deform_attn, inputs)
    expected = forward_and_grads(ms_deform_attn_reference, inputs)
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert e.abs().max() > 0, f"{name} of the reference is all zero: the case tests nothing"
        error = relative_error(a, e)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.1g}"


# Every head_dim, level count and point count of the spec, on non-square levels, batch 2.
LEVELS = {1: [(6, 9)], 4: [(7, 5), (4, 6), (3, 2), (1, 3)]}
CASES = list(itertools.product((1, 30, 32, 64, 71, 257), (1, 4), (1, 4, 8)))


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim,num_levels,num_points", CASES)
def test_matches_reference(head_dim, num_levels, num_points, dtype):
    seed = head_dim * 100 + num_levels * 10 + num_points
    inputs = make_inputs(2, LEVELS[num_levels], 2, head_dim, 5, num_points, dtype=dtype, seed=seed)
    assert_matches_reference(inputs, TOLERANCE[dtype])


@requires_cpu_kernel
def test_pixel_centres_and_corners_match_naive_bilinear():
    """Independent of grid_sample: locations at pixel centres, pixel corners and the map border."""
    level_shapes = [(3, 4), (2, 5)]
    value, spatial_shapes, level_start_index, _, _ = make_inputs(1, level_shapes, 1, 3, 1, 1, seed=3)
    points = [(0.5 / 4, 0.5 / 3), (0.0, 0.0), (1.0, 1.0), (0.25, 0.5), (3.5 / 4, 2.5 / 3), (-0.1, 0.4), (0.3, 1.1)]
    locations = torch.tensor(points, dtype=torch.float64)  # (Lq, 2), each on both levels
    num_queries = len(points)
    sampling_locations = locations[None, :, None, None, None, :].expand(1, num_queries, 1, 2, 1, 2)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64).view(2, 1).expand(1, num_queries, 1, 2, 1)
    output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, weights)
    levels = value[0, :, 0].split([12, 10])
    for q, (x, y) in enumerate(points):
        expected = 0.7 * naive_bilinear(levels[0].reshape(3, 4, 3), x, y)
        expected += -1.3 * naive_bilinear(levels[1].reshape(2, 5, 3), x, y)
        torch.testing.assert_close(output[0, q], expected, rtol=1e-12, atol=1e-12)
    # The oracle itself: the centre of pixel (row 0, col 0) reads exactly that pixel, and the
    # top-left corner of the map a quarter of it (three of its four corners are outside).
    torch.testing.assert_close(naive_bilinear(levels[0].reshape(3, 4, 3), 0.5 / 4, 0.5 / 3), levels[0][0])
    torch.testing.assert_close(naive_bilinear(levels[0].reshape(3, 4, 3), 0.0, 0.0), 0.25 * levels[0][0])


@requires_cpu_kernel
def test_adamixer_style_points_summed_over_levels_only():
    """AdaMixer / StageInteractor use: each (query, point) pair is its own query with one point per
    level, and its level weights need not sum to one (they may be negative or larger than one)."""
    batch, num_queries, num_points, num_heads, head_dim = 2, 3, 4, 2, 5
    level_shapes = [(5, 7), (3, 4), (2, 2)]
    value, spatial_shapes, level_start_index, _, _ = make_inputs(batch, level_shapes, num_heads, head_dim, 1, 1, seed=5)
    generator = torch.Generator().manual_seed(6)
    # (N, Q, P, M, 2) points shared by all levels, and free per-level weights (N, Q, P, M, L).
    points = torch.rand(batch, num_queries, num_points, num_heads, 2, generator=generator, dtype=torch.float64)
    level_weights = 3 * torch.randn(batch, num_queries, num_points, num_heads, 3, generator=generator, dtype=torch.float64)
    folded_locations = points.reshape(batch, num_queries * num_points, num_heads, 1, 1, 2).expand(-1, -1, -1, 3, 1, -1)
    folded_weights = level_weights.reshape(batch, num_queries * num_points, num_heads, 3, 1)
    output = ms_deform_attn(value, spatial_shapes, level_start_index, folded_locations, folded_weights)
    per_point = output.view(batch, num_queries, num_points, num_heads, head_dim)

    levels = value.split([35, 12, 4], dim=1)
    n, q, p, m = 1, 2, 3, 1
    expected = sum(
        level_weights[n, q, p, m, l]
        * naive_bilinear(levels[l][n, :, m].reshape(h, w, head_dim), *points[n, q, p, m].tolist())
        for l, (h, w) in enumerate(level_shapes)
    )
    torch.testing.assert_close(per_point[n, q, p, m], expected, rtol=1e-12, atol=1e-12)
    assert_matches_reference(
        (value, spatial_shapes, level_start_index, folded_locations.contiguous(), folded_weights), 1e-10
    )


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_non_finite_and_far_locations_contribute_nothing(dtype):
    """nan, +-inf, huge and far negative locations read nothing (no out-of-bounds access), give zero
    gradients, and leave the other samples untouched."""
    inputs = make_inputs(2, [(4, 6), (3, 3)], 2, 8, 6, 4, dtype=dtype, seed=7)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9, 2.0], dtype=dtype)
    poisoned = locations.clone()
    mask = torch.zeros(locations.shape[:-1], dtype=torch.bool)
    mask[:, :, :, :, 0] = True  # every first point of every level, for all queries and heads
    count = int(mask.sum())
    poisoned[mask] = bad[torch.arange(2 * count) % len(bad)].view(count, 2)
    # The same samples with zero attention weight contribute nothing either: the expected result.
    zeroed = weights.masked_fill(mask, 0)

    out_poisoned, grad_value, grad_locations, grad_weights = forward_and_grads(
        ms_deform_attn, (value, spatial_shapes, level_start_index, poisoned, weights)
    )
    out_zeroed, grad_value_zeroed, _, _ = forward_and_grads(
        ms_deform_attn, (value, spatial_shapes, level_start_index, locations, zeroed)
    )
    torch.testing.assert_close(out_poisoned, out_zeroed, rtol=0, atol=0)
    torch.testing.assert_close(grad_value, grad_value_zeroed, rtol=0, atol=0)
    assert torch.all(grad_locations[mask] == 0) and torch.all(grad_weights[mask] == 0)
    assert torch.isfinite(grad_locations).all() and torch.isfinite(grad_weights).all()


@requires_cpu_kernel
def test_non_contiguous_inputs():
    inputs = make_inputs(2, [(5, 4), (2, 3)], 3, 6, 4, 2, seed=8)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # Same values, other memory layouts: transposed storage and a strided view.
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    locations_nc = torch.stack([locations, -locations], dim=-1)[..., 0]
    weights_nc = weights.transpose(1, 3).contiguous().transpose(1, 3)
    shapes_nc = torch.stack([spatial_shapes, -spatial_shapes], dim=-1)[..., 0]
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    assert not shapes_nc.is_contiguous()
    torch.testing.assert_close(locations_nc, locations, rtol=0, atol=0)
    expected = forward_and_grads(ms_deform_attn, inputs)
    actual = forward_and_grads(ms_deform_attn, (value_nc, shapes_nc, level_start_index, locations_nc, weights_nc))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert_matches_reference((value_nc, shapes_nc, level_start_index, locations_nc, weights_nc), 1e-10)


@requires_cpu_kernel
@pytest.mark.parametrize("batch,num_heads", [(2, 4), (1, 2)])
def test_backward_is_deterministic_across_runs_and_thread_counts(batch, num_heads):
    """Bit-identical results for any thread count. The backward splits its work per (batch, head)
    when there are at least two such units per thread and per (batch, head, level) otherwise: with
    1, 2, 3 and 8 threads both splits run for both cases (batch 2 x 4 heads switches above 4
    threads, batch 1 x 2 heads above 1), and 3 threads divide the work unevenly."""
    # Thread counts only change the work split when the kernel's at::parallel_for runs on OpenMP.
    assert "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    inputs = make_inputs(batch, [(9, 11), (5, 6), (3, 3)], num_heads, 16, 64, 4, dtype=torch.float32, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = forward_and_grads(ms_deform_attn, inputs)
        for num_threads in (1, 2, 3, 8, max(2, threads)):
            torch.set_num_threads(num_threads)
            assert torch.get_num_threads() == num_threads
            again = forward_and_grads(ms_deform_attn, inputs)
            for a, b in zip(again, first):
                assert torch.equal(a, b), f"not bit-identical with {num_threads} threads"
    finally:
        torch.set_num_threads(threads)


@requires_cpu_kernel
def test_gradcheck_float64():
    inputs = make_inputs(1, [(3, 4), (2, 2)], 2, 3, 2, 2, seed=10, margin=0.2)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # gradcheck perturbs locations by 1e-6: keep them away from integer pixel coordinates, where the
    # bilinear interpolation has kinks and finite differences disagree with the exact derivative.
    shape = spatial_shapes.flip(-1).to(torch.float64)[None, None, None, :, None, :]  # (W, H) per level
    pixel = locations * shape - 0.5
    locations = ((pixel.floor() + 0.25 + 0.5 * (pixel - pixel.floor())) + 0.5) / shape

    def op(v, loc, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, loc, w)

    args = tuple(t.clone().requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_inputs_are_computed_in_float32(dtype):
    inputs = make_inputs(1, [(4, 5), (2, 3)], 2, 8, 4, 2, dtype=torch.float32, seed=11)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    # The kernel on 16-bit inputs equals the float32 kernel on the same (rounded) values, rounded once.
    rounded = tuple(t.to(torch.float32) if t.is_floating_point() else t for t in low)
    actual = forward_and_grads(ms_deform_attn, low)
    expected = forward_and_grads(ms_deform_attn, rounded, grad_output_dtype=dtype)
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e.to(dtype), rtol=0, atol=0)


@requires_cpu_kernel
@pytest.mark.parametrize("batch,num_queries", [(0, 3), (2, 0), (0, 0)])
def test_empty_inputs_give_empty_outputs(batch, num_queries):
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        batch, [(3, 2), (1, 2)], 2, 4, num_queries, 3, seed=12
    )
    output, grad_value, grad_locations, grad_weights = forward_and_grads(
        ms_deform_attn, (value, spatial_shapes, level_start_index, locations, weights)
    )
    assert output.shape == (batch, num_queries, 8)
    assert grad_value.shape == value.shape and grad_locations.shape == locations.shape
    assert grad_weights.shape == weights.shape
    assert torch.all(grad_value == 0)


@requires_cpu_kernel
def test_autocast_keeps_value_dtype_and_reads_locations_in_float32():
    inputs = make_inputs(1, [(4, 5), (2, 3)], 2, 8, 4, 2, dtype=torch.float32, seed=14)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    low_value = value.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(low_value, spatial_shapes, level_start_index, locations, weights)
        # 16-bit locations and weights are read in float32 (an exact conversion).
        from_16_bit = ms_deform_attn(
            low_value, spatial_shapes, level_start_index, locations.bfloat16(), weights.bfloat16()
        )
        expected = ms_deform_attn_reference(low_value, spatial_shapes, level_start_index, locations, weights)
    assert output.dtype == torch.bfloat16 == expected.dtype == from_16_bit.dtype
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    exact = ms_deform_attn(low_value.float(), spatial_shapes, level_start_index, locations, weights)
    torch.testing.assert_close(output, exact.bfloat16(), rtol=0, atol=0)
    rounded = ms_deform_attn(
        low_value, spatial_shapes, level_start_index, locations.bfloat16().float(), weights.bfloat16().float()
    )
    torch.testing.assert_close(from_16_bit, rounded, rtol=0, atol=0)


def _valid_inputs():
    return make_inputs(2, [(3, 4), (2, 2)], 2, 4, 3, 2, seed=13)


def _replace(index, tensor):
    inputs = list(_valid_inputs())
    inputs[index] = tensor
    return inputs


INVALID_INPUTS = {
    "value rank": (
        lambda: _replace(0, torch.zeros(2, 16, 8, dtype=torch.float64)), ValueError, r"value must be \(N, S, M, D\)"),
    "value rows": (lambda: _replace(0, torch.zeros(2, 15, 2, 4, dtype=torch.float64)), ValueError, "S = 15"),
    "value list": (lambda: _replace(0, [[0.0]]), TypeError, "value must be a torch.Tensor"),
    "value int": (
        lambda: _replace(0, torch.zeros(2, 16, 2, 4, dtype=torch.int64)), TypeError, "value must be float32"),
    "shapes rank": (lambda: _replace(1, torch.tensor([3, 4, 2, 2])), ValueError, "spatial_shapes"),
    "shapes float": (lambda: _replace(1, torch.tensor([[3.0, 4.0], [2.0, 2.0]])), TypeError, "spatial_shapes"),
    "shapes sum": (lambda: _replace(1, torch.tensor([[3, 4], [2, 3]])), ValueError, "spatial_shapes describe"),
    "shapes negative": (lambda: _replace(1, torch.tensor([[3, 4], [-2, -2]])), ValueError, "must not be negative"),
    "start value": (lambda: _replace(2, torch.tensor([0, 11])), ValueError, "level_start_index"),
    "start shape": (lambda: _replace(2, torch.tensor([0, 12, 16])), ValueError, "level_start_index"),
    "start int32": (lambda: _replace(2, torch.tensor([0, 12], dtype=torch.int32)), TypeError, "level_start_index"),
    "locations rank": (
        lambda: _replace(3, torch.zeros(2, 3, 2, 2, 4, dtype=torch.float64)), ValueError, "sampling_locations"),
    "locations levels": (
        lambda: _replace(3, torch.zeros(2, 3, 2, 3, 2, 2, dtype=torch.float64)), ValueError, "sampling_locations"),
    "locations dtype": (
        lambda: _replace(3, torch.zeros(2, 3, 2, 2, 2, 2, dtype=torch.float32)), TypeError, "sampling_locations"),
    "locations float64 with a 16-bit value": (
        lambda: [t.bfloat16() if i == 0 else t.double() if i == 3 else t for i, t in enumerate(_valid_inputs())],
        TypeError, "sampling_locations has dtype (torch.float64|Double)"),
    "weights points": (
        lambda: _replace(4, torch.zeros(2, 3, 2, 2, 3, dtype=torch.float64)), ValueError, "attention_weights"),
    "weights dtype": (
        lambda: _replace(4, torch.zeros(2, 3, 2, 2, 2, dtype=torch.float32)), TypeError, "attention_weights"),
    "weights device": (
        lambda: _replace(4, torch.zeros(2, 3, 2, 2, 2, dtype=torch.float64, device="meta")), ValueError,
        "attention_weights"),
}


@pytest.mark.parametrize("case", list(INVALID_INPUTS))
def test_invalid_inputs_raise_naming_the_argument(case):
    make, error, fragment = INVALID_INPUTS[case]
    with pytest.raises(error, match=fragment):
        ms_deform_attn(*make())


@requires_cpu_kernel
@pytest.mark.parametrize("case", [case for case in INVALID_INPUTS if case != "value list"])
def test_operator_validates_in_cpp(case, monkeypatch):
    """The C++ CPU kernel itself raises the same kinds of errors before computing: the Python checks
    are switched off, and the call goes to the CPU kernel directly (a plain call with a meta tensor
    would be answered by the Python fake kernel)."""
    monkeypatch.setattr(ms_deform_attn_op, "check_ms_deform_attn_inputs", lambda *args, **kwargs: None)
    make, error, fragment = INVALID_INPUTS[case]
    cpu_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(error, match=fragment):
        torch.ops.deformable_family.ms_deform_attn.default.redispatch(cpu_kernel, *make())


def test_compiled_kernels_reports_the_build():
    kernels = compiled_kernels()
    assert set(kernels) <= {"cpu", "cuda"}
    if ms_deform_attn_op._C is not None:
        assert kernels[0] == "cpu"
        assert ("cuda" in kernels) == ms_deform_attn_op._C.compiled_with_cuda()


def test_fallback_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setattr(ms_deform_attn_op, "_C", None)
    monkeypatch.setattr(ms_deform_attn_op, "_COMPILED_KERNELS", ())
    monkeypatch.setattr(ms_deform_attn_op, "_warned_fallback", set())
    inputs = _valid_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "ms_deform_attn_reference" in messages[0]
    assert "bash tools/setup_env.sh" in messages[0]  # the documented set-up, not a bare build_ext
    torch.testing.assert_close(output, ms_deform_attn_reference(*inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(*_replace(2, torch.tensor([0, 11])))


def _empty_level_case(empty_position: int, empty_shape: Tuple[int, int], dtype=torch.float64, seed: int = 30):
    """Three levels, one of them empty (at empty_position), 1x1 among the others."""
    level_shapes = [(3, 4), (1, 1), (2, 5)]
    level_shapes[empty_position] = empty_shape
    return make_inputs(2, level_shapes, 2, 3, 5, 3, dtype=dtype, seed=seed)


@requires_cpu_kernel
@pytest.mark.parametrize("empty_shape", [(2, 0), (0, 3), (0, 0)], ids=str)
@pytest.mark.parametrize("empty_position", [0, 1, 2])
def test_empty_levels_read_zero(empty_position, empty_shape):
    """A level with H or W = 0 is a defined input: its samples read zero (as outside the map), their
    gradients are zero, and the other levels are unaffected; kernel and reference agree."""
    inputs = _empty_level_case(empty_position, empty_shape)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    assert_matches_reference(inputs, 1e-10)
    output, grad_value, grad_locations, grad_weights = forward_and_grads(ms_deform_attn, inputs)
    assert torch.all(grad_locations[:, :, :, empty_position] == 0)
    assert torch.all(grad_weights[:, :, :, empty_position] == 0)
    # The same call with that level's weights at zero gives the same result: the level reads zero.
    zeroed = weights.clone()
    zeroed[:, :, :, empty_position] = 0
    expected = ms_deform_attn(value, spatial_shapes, level_start_index, locations, zeroed)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def _nan_guarded(tensor: torch.Tensor, guard_rows: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """A contiguous copy of tensor (N, S, M, D) living inside a larger nan-filled buffer, with nan
    just before and just after it: any read outside the copy turns into nan. Returns (copy, buffer)."""
    row = tensor[0, 0].numel() if tensor.shape[0] * tensor.shape[1] else 1
    guard = guard_rows * row
    buffer = torch.full((guard + tensor.numel() + guard,), float("nan"), dtype=tensor.dtype)
    inside = buffer[guard : guard + tensor.numel()].view(tensor.shape)
    inside.copy_(tensor)
    assert inside.is_contiguous() and inside.data_ptr() == buffer.data_ptr() + guard * buffer.element_size()
    return inside, buffer


@requires_cpu_kernel
def test_issue_reproduction_empty_level_reads_nothing_before_value():
    """The reported case: spatial_shapes [[2, 0], [3, 4]], level_start_index [0, 0], the row before
    value holding nan, locations 0.5 and all weight on the empty level: the output is exactly zero
    (before the fix the kernel read that row)."""
    generator = torch.Generator().manual_seed(31)
    value, _ = _nan_guarded(torch.randn(1, 12, 1, 4, generator=generator, dtype=torch.float64))
    spatial_shapes = torch.tensor([[2, 0], [3, 4]])
    level_start_index = torch.tensor([0, 0])
    locations = torch.full((1, 2, 1, 2, 1, 2), 0.5, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2, 1).expand(1, 2, 1, 2, 1).contiguous()
    output, grad_value, grad_locations, grad_weights = forward_and_grads(
        ms_deform_attn, (value, spatial_shapes, level_start_index, locations, weights)
    )
    assert torch.equal(output, torch.zeros_like(output))
    assert torch.isfinite(grad_value).all() and torch.isfinite(grad_locations).all()
    assert torch.equal(grad_weights[:, :, :, 0], torch.zeros_like(grad_weights[:, :, :, 0]))


@requires_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_no_read_leaves_value(dtype):
    """value lives in a nan-filled buffer: every location pattern (pixel centres, borders, corners,
    just outside, far outside, non-finite) on 1x1, empty and ordinary levels, at the first and last
    level, in forward and backward, gives finite results equal to the reference on a clean copy.
    (Not the 16-bit types: the CPU kernel reads those from a float32 copy of value.)"""
    level_shapes = [(0, 3), (1, 1), (3, 4), (2, 1), (4, 0)]
    num_levels = len(level_shapes)
    clean, spatial_shapes, level_start_index, _, weights = make_inputs(
        2, level_shapes, 2, 5, 1, 1, dtype=torch.float64, seed=32
    )
    coordinates = [0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0, 1.0 + 1e-7, -1e-7, -0.49, 1.49, -2.0, 3.0]
    special = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30]
    points = [(x, y) for x in coordinates for y in coordinates] + [(s, 0.5) for s in special] + [(0.5, s) for s in special]
    num_points = len(points)
    locations = torch.tensor(points, dtype=torch.float64).view(1, 1, 1, 1, num_points, 2)
    locations = locations.expand(2, 3, 2, num_levels, num_points, 2).contiguous()
    generator = torch.Generator().manual_seed(33)
    weights = torch.randn(2, 3, 2, num_levels, num_points, generator=generator, dtype=torch.float64)
    clean, locations, weights = (t.to(dtype) for t in (clean, locations, weights))
    guarded, _ = _nan_guarded(clean)
    actual = forward_and_grads(ms_deform_attn, (guarded, spatial_shapes, level_start_index, locations, weights))
    expected = forward_and_grads(ms_deform_attn_reference, (clean, spatial_shapes, level_start_index, locations, weights))
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    for name, a, e in zip(("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"), actual, expected):
        assert torch.isfinite(e).all(), f"the reference's {name} is not finite: the case tests nothing"
        assert torch.isfinite(a).all(), f"{name} is not finite: a read left value"
        if name != "grad_sampling_locations":  # exactly on pixel edges the two may pick different sides
            assert relative_error(a.double(), e.double()) <= tolerance, name


@requires_cpu_kernel
def test_inf_and_nan_in_value_never_make_a_finite_result_nan():
    """The CPU forward reads the clamped row of a corner outside the map with weight 0 (no branch).
    That row is another corner of the same sample, read with a positive weight: wherever grid_sample
    gives a finite result the kernel gives the same. (Where grid_sample multiplies an inside corner
    by weight 0, at exactly one pixel outside, it gives nan where the kernel reads nothing.)"""
    value, spatial_shapes, level_start_index, _, _ = make_inputs(1, [(3, 4)], 1, 2, 1, 1, seed=34)
    value = value.clone()
    value[0, 0, 0, 0] = float("inf")  # channel 0 of pixel (row 0, col 0)
    value[0, 11, 0, 0] = float("nan")  # channel 0 of pixel (row 2, col 3)
    # Pixel coordinates from -1.25 to W - 0.25 (H - 0.25): inside, on every border, on corners.
    xs = (torch.arange(-1.0, 4.0, 0.25, dtype=torch.float64) + 0.5) / 4
    ys = (torch.arange(-1.0, 3.0, 0.25, dtype=torch.float64) + 0.5) / 3
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    locations = grid.view(1, -1, 1, 1, 1, 2)
    weights = torch.ones(1, grid.shape[0], 1, 1, 1, dtype=torch.float64)
    output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    expected = ms_deform_attn_reference(value, spatial_shapes, level_start_index, locations, weights)
    finite = torch.isfinite(expected)
    assert 0 < int(finite.sum()) < finite.numel()
    torch.testing.assert_close(output[finite], expected[finite], rtol=1e-12, atol=1e-12)


@requires_cpu_kernel
@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("coordinate_dtype", ["float32", "16-bit"])
def test_mixed_dtypes_match_reference(value_dtype, coordinate_dtype):
    """float32 locations and weights with a 16-bit value: output and grad_value in value's dtype,
    the other gradients in float32, all equal to the float32 computation rounded once."""
    inputs = make_inputs(2, [(4, 5), (1, 1), (2, 3)], 2, 7, 5, 3, dtype=torch.float32, seed=35)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    low_value = value.to(value_dtype)
    if coordinate_dtype == "16-bit":
        locations, weights = locations.to(value_dtype), weights.to(value_dtype)
    mixed = (low_value, spatial_shapes, level_start_index, locations, weights)
    actual = forward_and_grads(ms_deform_attn, mixed, grad_output_dtype=value_dtype)
    expected = forward_and_grads(ms_deform_attn_reference, mixed, grad_output_dtype=value_dtype)
    exact = forward_and_grads(
        ms_deform_attn,
        (low_value.float(), spatial_shapes, level_start_index, locations.float(), weights.float()),
        grad_output_dtype=value_dtype,
    )
    for a, e, x, dtype in zip(actual, expected, exact, (value_dtype, value_dtype, locations.dtype, weights.dtype)):
        assert a.dtype == dtype == e.dtype
        # The kernel is the float32 kernel on the same values, rounded once to the output dtype.
        torch.testing.assert_close(a, x.to(dtype), rtol=0, atol=0)
        assert relative_error(a.double(), e.double()) <= (1e-2 if dtype == torch.bfloat16 else 1e-3)


@requires_cpu_kernel
def test_float32_locations_are_not_quantised_with_a_bfloat16_value():
    """The issue's example: near x = 1.0 on a 134-pixel-wide level, a bfloat16 location is off by up
    to a quarter pixel (spacing 2**-8, about half a pixel); a float32 location with the bfloat16
    value samples where it should."""
    width = 134
    # value = pixel index - 130: small integers, exact in bfloat16, and an output near 1.7 that
    # bfloat16 rounds by at most 2**-8.
    value = (torch.arange(width, dtype=torch.float64) - 130).view(1, width, 1, 1)
    spatial_shapes, level_start_index = level_tensors([(1, width)])
    x = (131.7 + 0.5) / width  # pixel coordinate 131.7: reads 1.7
    locations = torch.tensor([x, 0.5], dtype=torch.float32).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float32)
    output = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, locations, weights)
    assert output.dtype == torch.bfloat16
    assert abs(float(output) - 1.7) <= 2**-7
    quantised = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, locations.bfloat16(), weights.bfloat16())
    assert abs(float(quantised) - 1.7) > 0.2, "bfloat16 locations are precise enough here: the case tests nothing"


@requires_cpu_kernel
def test_cpu_backward_is_allowed_in_deterministic_mode():
    inputs = make_inputs(1, [(3, 4)], 2, 4, 3, 2, seed=36)
    mode = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        forward_and_grads(ms_deform_attn, inputs)
    finally:
        torch.use_deterministic_algorithms(mode)


@requires_cpu_kernel
def test_spatial_shapes_list_gives_the_same_result_and_is_validated():
    inputs = _valid_inputs()
    value, spatial_shapes, level_start_index, locations, weights = inputs
    expected = ms_deform_attn(*inputs)
    for levels in ([(3, 4), (2, 2)], [[3, 4], [2, 2]], ((3, 4), (2, 2))):
        output = ms_deform_attn(*inputs, spatial_shapes_list=levels)
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for levels, error, fragment in (
        (spatial_shapes, TypeError, "spatial_shapes_list must be a list of"),
        ([(3, 4), (2, 2.0)], TypeError, "spatial_shapes_list must hold"),
        ([(3, 4)], ValueError, "spatial_shapes_list has 1 levels"),
        ([(3, 4), (2, 3)], ValueError, "spatial_shapes_list describe sum"),
        ([(3, 4), (-2, -2)], ValueError, r"spatial_shapes_list\[1\] = \(-2, -2\) must not be negative"),
        ([(4, 3), (2, 2)], ValueError, "spatial_shapes_list .* differs from spatial_shapes"),
    ):
        with pytest.raises(error, match=fragment):
            ms_deform_attn(*inputs, spatial_shapes_list=levels)


def test_level_tensors_on_a_device_are_read_once_per_distinct_pair(monkeypatch):
    """Without spatial_shapes_list, level tensors on a GPU are copied to the host once per distinct
    (unmodified) pair; shown on CPU tensors through the same cache, with the copy counted."""
    reads = []
    read = ms_deform_attn_op._read_level_values

    def counting_read(spatial_shapes, level_start_index):
        reads.append(1)
        return read(spatial_shapes, level_start_index)

    monkeypatch.setattr(ms_deform_attn_op, "_read_level_values", counting_read)
    monkeypatch.setattr(ms_deform_attn_op, "_checked_level_tensors", {})
    value, spatial_shapes, level_start_index, _, _ = _valid_inputs()

    def check(shapes, starts, num_rows=16):
        ms_deform_attn_op._check_level_tensors(shapes, starts, num_rows, value.shape, remember=True)

    check(spatial_shapes, level_start_index)
    check(spatial_shapes, level_start_index)
    assert len(reads) == 1
    level_start_index.add_(0)  # an in-place change (even a no-op) invalidates the entry
    check(spatial_shapes, level_start_index)
    assert len(reads) == 2
    check(spatial_shapes.clone(), level_start_index)  # another tensor
    assert len(reads) == 3
    with pytest.raises(ValueError, match="S = 17"):
        check(spatial_shapes, level_start_index, num_rows=17)
    bad_starts = torch.tensor([0, 11])
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="level_start_index"):
            check(spatial_shapes, bad_starts)
    assert len(reads) == 6
    with torch.inference_mode():  # no version counter: read on every call
        shapes, starts = spatial_shapes.clone(), level_start_index.clone()
    check(shapes, starts)
    check(shapes, starts)
    assert len(reads) == 8
