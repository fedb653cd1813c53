"""The project's own modules on the op under torch.compile(fullgraph=True), with dynamic shapes, and
torch.export; torch.library.opcheck of the custom ops. CPU, tiny shapes.

fullgraph=True fails on any graph break, and a host read of a tensor value (``.item()``,
``.tolist()``, ``int(tensor)``) is one: these tests also show that MSDeformAttn, the encoder and
decoder (layers and stacks) and the transformer read no tensor on the host in forward or backward
when given the level sizes as Python ints.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from deformable_family.layers import MSDeformAttn
from deformable_family.layers.ms_deform_attn_op import compiled_kernels
from deformable_family.modeling.deformable_detr.transformer import (
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    DeformableTransformer,
)

if __package__:
    from .test_ms_deform_attn import level_tensors, make_inputs
else:
    from test_ms_deform_attn import level_tensors, make_inputs

pytestmark = pytest.mark.skipif(
    "cpu" not in compiled_kernels(), reason="deformable_family._C (the compiled CPU kernel) is not built"
)

D_MODEL, N_HEADS, N_LEVELS, N_POINTS = 8, 2, 2, 2
LEVELS_A = [(3, 4), (2, 2)]
LEVELS_B = [(5, 3), (1, 2)]  # other sizes: a dynamic graph must serve both without recompiling


def _levels(level_shapes, batch=2, seed=0, num_queries=None):
    """Inputs shared by the modules: flattened maps, padding mask, level tensors and sizes."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(level_shapes)
    num_rows = sum(h * w for h, w in level_shapes)
    src = torch.randn(batch, num_rows, D_MODEL, generator=generator, dtype=torch.float64)
    pos = torch.randn(batch, num_rows, D_MODEL, generator=generator, dtype=torch.float64)
    mask = torch.zeros(batch, num_rows, dtype=torch.bool)
    mask[1, -1] = True
    num_queries = num_rows if num_queries is None else num_queries
    query = torch.randn(batch, num_queries, D_MODEL, generator=generator, dtype=torch.float64)
    return src, pos, mask, query, spatial_shapes, level_start_index, list(level_shapes), generator


def _attention_case(level_shapes, seed=0):
    src, _, mask, query, spatial_shapes, level_start_index, shapes_list, generator = _levels(level_shapes, seed=seed, num_queries=5)
    reference_points = torch.rand(2, 5, N_LEVELS, 2, generator=generator, dtype=torch.float64)
    tensors = (query, reference_points, src, spatial_shapes, level_start_index, mask)
    return tensors, {"spatial_shapes_list": shapes_list}


def _encoder_layer_case(level_shapes, seed=0):
    src, pos, mask, _, spatial_shapes, level_start_index, shapes_list, generator = _levels(level_shapes, seed=seed)
    reference_points = torch.rand(2, src.shape[1], N_LEVELS, 2, generator=generator, dtype=torch.float64)
    return (src, pos, reference_points, spatial_shapes, level_start_index, mask), {"spatial_shapes_list": shapes_list}


def _decoder_layer_case(level_shapes, seed=0):
    memory, _, mask, query, spatial_shapes, level_start_index, shapes_list, generator = _levels(
        level_shapes, seed=seed, num_queries=4
    )
    query_pos = torch.randn(query.shape, generator=generator, dtype=torch.float64)
    boxes = torch.rand(2, 4, N_LEVELS, 4, generator=generator, dtype=torch.float64)  # box-modulated sampling
    tensors = (query, query_pos, boxes, memory, spatial_shapes, level_start_index, mask)
    return tensors, {"spatial_shapes_list": shapes_list}


def _build(name):
    torch.manual_seed(0)
    layer_args = dict(d_model=D_MODEL, d_ffn=16, dropout=0.0, n_levels=N_LEVELS, n_heads=N_HEADS, n_points=N_POINTS)
    modules = {
        "MSDeformAttn": lambda: MSDeformAttn(D_MODEL, N_LEVELS, N_HEADS, N_POINTS),
        "DeformableEncoderLayer": lambda: DeformableEncoderLayer(**layer_args),
        "DeformableDecoderLayer": lambda: DeformableDecoderLayer(**layer_args),
    }
    cases = {
        "MSDeformAttn": _attention_case,
        "DeformableEncoderLayer": _encoder_layer_case,
        "DeformableDecoderLayer": _decoder_layer_case,
    }
    module = modules[name]().double()
    with torch.no_grad():  # offsets that are not all alike, so the samples spread over the maps
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module, cases[name]


def _first_output(result):
    return result[0] if isinstance(result, tuple) else result


def _output_and_grads(module, tensors, kwargs):
    """Forward, then backward of a fixed function of the output; the gradients of the float inputs
    and of every parameter."""
    leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in tensors]
    output = _first_output(module(*leaves, **kwargs))
    output.square().sum().backward()
    grads = [t.grad for t in leaves if t.is_floating_point()] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return output.detach(), grads


def _assert_same(actual, expected, tolerance):
    output, grads = actual
    expected_output, expected_grads = expected
    torch.testing.assert_close(output, expected_output, rtol=tolerance, atol=tolerance)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["MSDeformAttn", "DeformableEncoderLayer", "DeformableDecoderLayer"])
def test_fullgraph_compile_forward_and_backward_match_eager(name):
    module, make_case = _build(name)
    tensors, kwargs = make_case(LEVELS_A)
    expected = _output_and_grads(module, tensors, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    _assert_same(_output_and_grads(compiled, tensors, kwargs), expected, 1e-12)


@pytest.mark.parametrize("name", ["MSDeformAttn", "DeformableEncoderLayer", "DeformableDecoderLayer"])
def test_dynamic_shapes_one_graph_for_other_level_sizes(name):
    """dynamic=True: a second call with other level sizes, sequence length and query count reuses
    the graph (no recompilation) and matches eager."""
    module, make_case = _build(name)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for seed, level_shapes in enumerate((LEVELS_A, LEVELS_B)):
        tensors, kwargs = make_case(level_shapes, seed=seed)
        _assert_same(_output_and_grads(compiled, tensors, kwargs), _output_and_grads(module, tensors, kwargs), 1e-12)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for other sizes: frames compiled {frames}"


def test_inductor_runs_the_custom_op_in_msdeformattn():
    module, make_case = _build("MSDeformAttn")
    tensors, kwargs = make_case(LEVELS_A)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*tensors, **kwargs), module(*tensors, **kwargs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["MSDeformAttn", "DeformableEncoderLayer", "DeformableDecoderLayer"])
def test_export_keeps_the_custom_op(name):
    module, make_case = _build(name)
    tensors, kwargs = make_case(LEVELS_A)
    exported = torch.export.export(module, tensors, kwargs)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.deformable_family.ms_deform_attn.default in targets
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(*tensors, **kwargs), module(*tensors, **kwargs), rtol=1e-12, atol=1e-12
        )


def test_transformer_compiles_fullgraph():
    """The whole transformer (encoder, two-stage proposals, refinement decoder) in one graph: no
    host read of a tensor anywhere in its forward."""
    torch.manual_seed(0)
    layer_args = dict(d_model=D_MODEL, d_ffn=16, dropout=0.0, n_levels=N_LEVELS, n_heads=N_HEADS, n_points=N_POINTS)
    transformer = DeformableTransformer(
        DeformableEncoder(num_layers=1, **layer_args),
        DeformableDecoder(num_layers=2, **layer_args),
        d_model=D_MODEL,
        num_levels=N_LEVELS,
        two_stage=True,
        two_stage_num_proposals=6,
    )
    box_heads = torch.nn.ModuleList(torch.nn.Linear(D_MODEL, 4) for _ in range(2))
    class_head = torch.nn.Linear(D_MODEL, 3)
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, D_MODEL, h, w, generator=generator) for h, w in LEVELS_A]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in LEVELS_A]
    masks[0][1, :, -1] = True  # the second image is narrower
    pos = [torch.randn(f.shape, generator=generator) for f in features]

    def run(model):
        return model(features, masks, pos, None, box_heads, class_head, box_heads[0])["hidden_states"]

    expected = run(transformer)
    torch._dynamo.reset()
    compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled), expected, rtol=1e-5, atol=1e-5)


def _opcheck_cases():
    float64 = make_inputs(2, [(3, 4), (2, 2)], 2, 3, 4, 2, seed=40)
    empty_level = make_inputs(1, [(3, 0), (1, 1), (2, 3)], 2, 5, 3, 2, dtype=torch.float32, seed=41)
    value, shapes, starts, locations, weights = make_inputs(1, [(4, 5), (2, 3)], 2, 4, 3, 2, dtype=torch.float32, seed=42)
    mixed = (value.bfloat16(), shapes, starts, locations, weights)
    return {"float64": float64, "float32 with an empty level": empty_level, "bfloat16 value, float32 locations": mixed}


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_forward_and_backward_ops(case):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and
    AOT dispatch (static and dynamic) of both ops agree with the real kernels."""
    value, spatial_shapes, level_start_index, locations, weights = _opcheck_cases()[case]
    args = (value.requires_grad_(), spatial_shapes, level_start_index, locations.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.deformable_family.ms_deform_attn.default, args)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    backward_args = tuple(t.detach() for t in args) + (grad_output,)
    torch.library.opcheck(torch.ops.deformable_family.ms_deform_attn_backward.default, backward_args)
