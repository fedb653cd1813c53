"""ms_deform_attn under torch.compile(fullgraph=True) and torch.export (CPU, tiny shapes: slow tests)."""
import pytest
import torch
from torch import nn

from deformable_family.layers import ms_deform_attn
from deformable_family.layers.ms_deform_attn_op import compiled_kernels

if __package__:
    from .test_ms_deform_attn import make_inputs
else:
    from test_ms_deform_attn import make_inputs

pytestmark = pytest.mark.skipif(
    "cpu" not in compiled_kernels(), reason="deformable_family._C (the compiled CPU kernel) is not built"
)


class TinySampler(nn.Module):
    """Predicts locations and weights from queries, samples, projects: the shape of MSDeformAttn."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.output = nn.Linear(dim, dim)

    def forward(self, query, value, spatial_shapes, level_start_index):
        batch, num_queries, dim = query.shape
        shape = (batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        locations = torch.sigmoid(self.offsets(query)).view(*shape, 2)
        weights = self.weights(query).view(batch, num_queries, self.num_heads, -1).softmax(-1).view(shape)
        value = value.view(batch, value.shape[1], self.num_heads, dim // self.num_heads)
        return self.output(ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights))


def _module_and_inputs():
    torch.manual_seed(0)
    module = TinySampler(dim=8, num_heads=2, num_levels=2, num_points=2).double()
    value, spatial_shapes, level_start_index, _, _ = make_inputs(2, [(3, 4), (2, 2)], 2, 4, 1, 1, seed=1)
    query = torch.randn(2, 5, 8, dtype=torch.float64)
    return module, (query, value.flatten(2), spatial_shapes, level_start_index)


def _output_and_grads(module, inputs):
    query, value = (t.clone().requires_grad_() for t in inputs[:2])
    output = module(query, value, *inputs[2:])
    output.square().sum().backward()
    grads = [query.grad, value.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return output.detach(), grads


def test_compile_fullgraph_forward_and_backward_match_eager():
    module, inputs = _module_and_inputs()
    expected_output, expected_grads = _output_and_grads(module, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    output, grads = _output_and_grads(compiled, inputs)
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_compile_with_inductor_runs_the_custom_op():
    module, inputs = _module_and_inputs()
    expected_output, _ = _output_and_grads(module, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        output = compiled(*inputs)
    torch.testing.assert_close(output, expected_output, rtol=1e-10, atol=1e-10)


def test_export_keeps_the_custom_op():
    module, inputs = _module_and_inputs()
    exported = torch.export.export(module, inputs)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.deformable_family.ms_deform_attn.default in targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), module(*inputs), rtol=1e-12, atol=1e-12)
