"""The Triton kernels of ms_deform_attn against the reference, and MSDeformAttn switched to them by
config.

These tests need the kernels to run: on a GPU they run compiled on CUDA tensors; without one they run
on CPU tensors in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before the
kernels are defined. test_ms_deform_attn_triton_backend.py runs this file that way, in a subprocess,
as part of the normal suite; in a process without a GPU or the interpreter this file skips.

    TRITON_INTERPRET=1 python -m pytest tests/layers/test_ms_deform_attn_triton.py
"""

import importlib
import os

import pytest
import torch

from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_triton
from deformable_family.layers.deformable_attention import MSDeformAttn

if __package__:
    from .test_ms_deform_attn import forward_and_grads, make_inputs, relative_error
else:
    from test_ms_deform_attn import forward_and_grads, make_inputs, relative_error

triton_module = importlib.import_module("deformable_family.layers.ms_deform_attn_triton")
try:
    INTERPRETED = triton_module.triton_interpreted()
except RuntimeError as e:  # triton is not installed
    pytest.skip(str(e), allow_module_level=True)
if INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip(
        "the Triton kernels need a GPU or Triton's interpreter; without a GPU, "
        "test_ms_deform_attn_triton_backend.py runs this file with TRITON_INTERPRET=1",
        allow_module_level=True,
    )

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# float32 kernels against the float64 reference: values and the three gradients (issue 15).
FLOAT32_TOLERANCE = 1e-4


def _to(inputs, device=DEVICE, dtype=None):
    return tuple(
        t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        for t in inputs
    )


def assert_close_to_reference(inputs, tolerance, grad_output_dtype=None, names=None):
    """ms_deform_attn_triton on inputs (on DEVICE) against the reference in float64 on the CPU on the
    same values: output and the gradients of value, sampling_locations, attention_weights."""
    names = names or ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")
    actual = forward_and_grads(ms_deform_attn_triton, inputs, grad_output_dtype=grad_output_dtype)
    expected = forward_and_grads(
        ms_deform_attn_reference,
        _to(inputs, "cpu", torch.float64),
        grad_output_dtype=grad_output_dtype,
    )
    value, _, _, locations, weights = inputs
    for name, a, e, given in zip(names, actual, expected, (value, value, locations, weights)):
        assert a.device.type == DEVICE and a.dtype == given.dtype, name
        assert e.abs().max() > 0, f"{name} of the reference is all zero: the case tests nothing"
        error = relative_error(a.cpu().double(), e)
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:.1g}"


# (head_dim, levels (H, W), points, queries): odd and power-of-two channels, 1 to 5 levels with 1x1
# maps, points 1 to 8, and query counts that fill one partial block or span several blocks.
CASES = {
    "d1-l1-1x1-p1": (1, [(1, 1)], 1, 3),
    "d5-l2-p2": (5, [(6, 9), (1, 1)], 2, 5),
    "d3-l3-p4": (3, [(4, 5), (1, 3), (2, 2)], 4, 6),
    "d33-l4-p8": (33, [(7, 5), (4, 6), (3, 2), (1, 3)], 8, 5),
    "d7-l5-p3": (7, [(7, 5), (4, 6), (3, 2), (1, 3), (1, 1)], 3, 4),
    "d32-l2-p4-q70": (32, [(5, 8), (3, 4)], 4, 70),
    "d4-l4-empty-p2": (4, [(4, 5), (0, 3), (2, 2), (3, 0)], 2, 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case):
    head_dim, level_shapes, num_points, num_queries = CASES[case]
    seed = head_dim * 100 + len(level_shapes) * 10 + num_points
    # margin 0.3: some samples fall partly or wholly outside their map.
    inputs = make_inputs(
        2, level_shapes, 2, head_dim, num_queries, num_points, dtype=torch.float32, seed=seed
    )
    assert_close_to_reference(_to(inputs), FLOAT32_TOLERANCE)


def test_empty_levels_read_zero():
    """A level with H or W = 0 reads nothing: the result equals the same call without that level,
    and the gradients of its locations and weights are zero."""
    level_shapes = [(4, 5), (0, 3), (2, 2), (3, 0), (1, 1)]
    kept = [0, 2, 4]
    inputs = make_inputs(2, level_shapes, 2, 5, 6, 3, dtype=torch.float32, seed=31)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    actual = forward_and_grads(ms_deform_attn_triton, _to(inputs))
    without = make_inputs(
        2, [level_shapes[i] for i in kept], 2, 5, 6, 3, dtype=torch.float32, seed=31
    )
    without = (
        (value,) + without[1:3] + (locations[:, :, :, kept].contiguous(), weights[:, :, :, kept])
    )
    expected = forward_and_grads(ms_deform_attn_reference, _to(without, "cpu", torch.float64))
    for name, a, e in zip(("output", "grad_value"), actual[:2], expected[:2]):
        assert relative_error(a.cpu().double(), e) <= FLOAT32_TOLERANCE, name
    assert relative_error(actual[2][:, :, :, kept].cpu().double(), expected[2]) <= FLOAT32_TOLERANCE
    assert relative_error(actual[3][:, :, :, kept].cpu().double(), expected[3]) <= FLOAT32_TOLERANCE
    empty = [1, 3]
    assert torch.all(actual[2][:, :, :, empty] == 0) and torch.all(actual[3][:, :, :, empty] == 0)


def test_outside_and_non_finite_locations_read_nothing():
    """nan, +-inf, huge, far negative and just-outside locations read nothing and get zero gradients;
    the other samples are untouched (compared with the same samples at zero weight, and with the
    reference)."""
    inputs = make_inputs(2, [(4, 6), (3, 3)], 2, 9, 6, 4, dtype=torch.float32, seed=32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # Just outside: a pixel centre one pixel left of / below the map has all four corners outside.
    bad = torch.tensor(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            1e30,
            -1e30,
            3e9,
            -3e9,
            2.0,
            -0.5,
            1.0 + 1.0 / 3,
        ]
    )
    poisoned = locations.clone()
    mask = torch.zeros(locations.shape[:-1], dtype=torch.bool)
    mask[:, :, :, :, 0] = True  # every first point of every level
    count = int(mask.sum())
    poisoned[mask] = bad[torch.arange(2 * count) % len(bad)].view(count, 2)
    zeroed = weights.masked_fill(mask, 0)
    actual = forward_and_grads(
        ms_deform_attn_triton, _to((value, spatial_shapes, level_start_index, poisoned, weights))
    )
    expected = forward_and_grads(
        ms_deform_attn_triton, _to((value, spatial_shapes, level_start_index, locations, zeroed))
    )
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=1e-6)
    assert torch.all(actual[2][mask.to(DEVICE)] == 0) and torch.all(actual[3][mask.to(DEVICE)] == 0)
    assert torch.isfinite(actual[2]).all() and torch.isfinite(actual[3]).all()
    assert_close_to_reference(
        _to((value, spatial_shapes, level_start_index, locations, zeroed)), FLOAT32_TOLERANCE
    )


def test_no_read_outside_value_whatever_the_level_tensors_hold():
    """The kernels mask every corner to rows 0 <= row < S, so level tensors that disagree with value
    (which validation rejects, and which a GPU call given spatial_shapes_list does not read) cannot
    make them read outside it. value sits between nan guard rows; the autograd function is called
    directly, without validation, with levels that overrun value at both ends."""
    num_rows, guard = 12, 16
    generator = torch.Generator().manual_seed(38)
    buffer = torch.full((1, guard + num_rows + guard, 2, 4), float("nan"))
    buffer[:, guard : guard + num_rows] = torch.randn(1, num_rows, 2, 4, generator=generator)
    value = buffer[:, guard : guard + num_rows].to(DEVICE)  # contiguous: no copy on the CPU
    if DEVICE == "cpu":  # on a GPU the guard rows are not copied with value
        assert value.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert value.is_contiguous()
    spatial_shapes = torch.tensor([[4, 5], [3, 6]], device=DEVICE)  # 38 rows described, 12 exist
    level_start_index = torch.tensor([-8, 10], device=DEVICE)
    locations = torch.rand(1, 6, 2, 2, 4, 2, generator=generator).to(DEVICE)
    weights = torch.rand(1, 6, 2, 2, 4, generator=generator).to(DEVICE)
    # detach, not clone: value must stay inside the guarded buffer.
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    output = triton_module._MSDeformAttnTriton.apply(
        leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2]
    )
    grads = torch.autograd.grad(output, leaves, torch.ones_like(output))
    assert torch.isfinite(output).all() and output.abs().max() > 0
    assert all(torch.isfinite(g).all() for g in grads)


# A 16-bit result is the float32 accumulation rounded once: within half an ulp of the largest value
# (2^-11 for float16, 2^-8 for bfloat16), with margin.
HALF_TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_value_forward_and_backward(dtype):
    inputs = make_inputs(2, [(7, 5), (4, 6), (3, 2)], 2, 17, 9, 4, dtype=torch.float32, seed=33)
    assert_close_to_reference(
        _to(inputs, dtype=dtype), HALF_TOLERANCE[dtype], grad_output_dtype=dtype
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_value_with_float32_locations_and_weights(dtype):
    """The mixed precision of autocast training: a 16-bit value projection, float32 softmax weights
    and locations. The result has value's dtype; the location and weight gradients stay float32."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        1, [(5, 6), (2, 3)], 2, 8, 7, 3, dtype=torch.float32, seed=34
    )
    inputs = _to((value.to(dtype), spatial_shapes, level_start_index, locations, weights))
    assert_close_to_reference(inputs, HALF_TOLERANCE[dtype], grad_output_dtype=dtype)


def test_empty_inputs_give_empty_outputs():
    for batch, num_queries, head_dim in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        inputs = _to(
            make_inputs(batch, [(3, 2), (1, 2)], 2, head_dim, num_queries, 3, dtype=torch.float32)
        )
        output, grad_value, grad_locations, grad_weights = forward_and_grads(
            ms_deform_attn_triton, inputs
        )
        assert output.shape == (batch, num_queries, 2 * head_dim)
        assert grad_value.shape == inputs[0].shape and grad_locations.shape == inputs[3].shape
        assert not grad_locations.any() and not grad_weights.any()


def test_non_contiguous_inputs():
    inputs = make_inputs(2, [(5, 4), (2, 3)], 3, 6, 4, 2, dtype=torch.float32, seed=35)
    value, spatial_shapes, level_start_index, locations, weights = _to(inputs)
    value_nc = value.transpose(0, 2).contiguous().transpose(0, 2)
    weights_nc = weights.transpose(1, 3).contiguous().transpose(1, 3)
    assert not (value_nc.is_contiguous() or weights_nc.is_contiguous())
    expected = forward_and_grads(
        ms_deform_attn_triton, (value, spatial_shapes, level_start_index, locations, weights)
    )
    actual = forward_and_grads(
        ms_deform_attn_triton, (value_nc, spatial_shapes, level_start_index, locations, weights_nc)
    )
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_backward_alerts_under_deterministic_algorithms(monkeypatch):
    """Compiled, the value gradient's atomic adds make the backward non-deterministic: like torch's
    own CUDA ops it raises under torch.use_deterministic_algorithms(True) and warns with warn_only.
    (The interpreter runs programs in order, so there it is deterministic and silent.)"""
    inputs = _to(make_inputs(1, [(4, 5)], 2, 4, 3, 2, dtype=torch.float32, seed=37))
    value = inputs[0].clone().requires_grad_()
    output = ms_deform_attn_triton(value, *inputs[1:])
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        if INTERPRETED:
            torch.autograd.grad(output.sum(), value, retain_graph=True)  # silent
        monkeypatch.setattr(triton_module, "triton_interpreted", lambda: False)  # as when compiled
        with pytest.raises(
            RuntimeError, match="ms_deform_attn_triton backward does not have a determ"
        ):
            torch.autograd.grad(output.sum(), value, retain_graph=True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_triton backward"):
            torch.autograd.grad(output.sum(), value, retain_graph=True)
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def test_same_validation_as_ms_deform_attn():
    value, spatial_shapes, level_start_index, locations, weights = _to(
        make_inputs(2, [(3, 4), (2, 2)], 2, 4, 3, 2, dtype=torch.float32)
    )
    with pytest.raises(ValueError, match="S = 15"):
        ms_deform_attn_triton(value[:, :15], spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, spatial_shapes, level_start_index, locations, weights[..., :1])
    with pytest.raises(TypeError, match="value must be a torch.Tensor"):
        ms_deform_attn_triton([[0.0]], spatial_shapes, level_start_index, locations, weights)
    with pytest.raises(TypeError, match="float64"):
        ms_deform_attn_triton(
            value.double(), spatial_shapes, level_start_index, locations.double(), weights.double()
        )


def test_ms_deform_attn_backend_argument_runs_triton(monkeypatch):
    inputs = _to(make_inputs(1, [(4, 5), (2, 3)], 2, 8, 4, 2, dtype=torch.float32, seed=36))
    calls = []
    real = triton_module.ms_deform_attn_triton
    monkeypatch.setattr(
        triton_module,
        "ms_deform_attn_triton",
        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs),
    )
    output = ms_deform_attn(*inputs, backend="triton")
    assert len(calls) == 1
    torch.testing.assert_close(output, ms_deform_attn(*inputs), rtol=1e-5, atol=1e-6)


def _model_from_config(**overrides):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "quickstart", "deformable_detr_shapes.py"))
    # One-stage: the two-stage top-k proposal choice could flip on float noise between backends.
    overrides = {"model.two_stage": False, **overrides}
    cfg = LazyConfig.apply_overrides(cfg, [f"{key}={value}" for key, value in overrides.items()])
    return instantiate(cfg.model).to(DEVICE).eval()


def test_msdeformattn_switched_to_triton_by_config(monkeypatch):
    """model.transformer.{encoder,decoder}.attn_backend=triton makes every MSDeformAttn of the model
    sample with the Triton kernels; outputs and parameter gradients equal those of the default
    backend (the compiled kernel, or the reference where the extension is not built)."""
    torch.manual_seed(0)
    # Two heads, one decoder layer and a 32 x 40 image keep the interpreter's programs few (its cost
    # is per program and per operation, not per element).
    small = {
        "model.transformer.encoder.n_heads": 2,
        "model.transformer.decoder.n_heads": 2,
        "model.transformer.decoder.num_layers": 1,
    }
    triton_model = _model_from_config(
        **small,
        **{
            "model.transformer.encoder.attn_backend": "triton",
            "model.transformer.decoder.attn_backend": "triton",
        },
    )
    default_model = _model_from_config(**small)
    default_model.load_state_dict(triton_model.state_dict())
    attention = [m for m in triton_model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attention) == 2  # 1 encoder + 1 decoder layer
    assert all(m.attn_backend == "triton" for m in attention)
    assert all(
        m.attn_backend == "extension"
        for m in default_model.modules()
        if isinstance(m, MSDeformAttn)
    )

    calls = []
    real = triton_module.ms_deform_attn_triton
    monkeypatch.setattr(
        triton_module,
        "ms_deform_attn_triton",
        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs),
    )
    images = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.zeros(1, 32, 40, dtype=torch.bool, device=DEVICE)
    mask[:, :, 36:] = True  # padding on the right
    results = []
    for model in (triton_model, default_model):
        outputs = model.forward_outputs(images, mask)
        loss = outputs["pred_logits"].sigmoid().sum() + outputs["pred_boxes"].sum()
        grads = torch.autograd.grad(
            loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True
        )
        results.append((outputs["pred_logits"], outputs["pred_boxes"], grads))
    assert len(calls) == len(
        attention
    ), f"Triton ran {len(calls)} times for {len(attention)} MSDeformAttn"
    (logits_t, boxes_t, grads_t), (logits_d, boxes_d, grads_d) = results
    assert relative_error(logits_t.double(), logits_d.double()) <= FLOAT32_TOLERANCE
    assert relative_error(boxes_t.double(), boxes_d.double()) <= FLOAT32_TOLERANCE
    names = [name for name, p in triton_model.named_parameters() if p.requires_grad]
    for name, g_t, g_d in zip(names, grads_t, grads_d):
        assert (g_t is None) == (g_d is None), name
        if g_d is not None and g_d.abs().max() > 0:
            assert relative_error(g_t.double(), g_d.double()) <= 1e-3, name
