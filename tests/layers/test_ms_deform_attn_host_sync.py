"""No host read of a GPU tensor in the op wrapper, MSDeformAttn, the encoder, the decoder and the
transformer, forward and backward: each read would be a device-to-host copy that synchronises with
the GPU and cannot be captured in a CUDA graph.

Shown without a GPU: the modules run on the "meta" device, whose tensors have no data, so any read
of a tensor value on the host (``.item()``, ``.tolist()``, ``int(tensor)``, ``bool(tensor)``)
raises. ms_deform_attn is told that meta has a compiled kernel, so it takes the path of a GPU call
(only CPU level tensors are read for validation) and runs the op's registered fake implementation,
forward and backward. On a GPU, test_ms_deform_attn_cuda.py checks the same with
torch.cuda.set_sync_debug_mode("error"), autocast included.
"""
import pytest
import torch

from deformable_family.layers import MSDeformAttn, ms_deform_attn
from deformable_family.layers import ms_deform_attn_op
from deformable_family.modeling.deformable_detr.transformer import (
    DeformableDecoder,
    DeformableEncoder,
    DeformableTransformer,
)

pytestmark = pytest.mark.skipif(
    "cpu" not in ms_deform_attn_op.compiled_kernels(),
    reason="deformable_family._C (the compiled op and its fake implementation) is not built",
)

LEVELS = [(3, 4), (2, 2)]
DEVICE = "meta"
HOST_READ_ERRORS = (RuntimeError, NotImplementedError)  # what reading a meta tensor raises


@pytest.fixture
def fake_gpu(monkeypatch):
    """ms_deform_attn takes the compiled-kernel path for meta tensors (the fake implementation)."""
    monkeypatch.setattr(ms_deform_attn_op, "_COMPILED_KERNELS", ("cpu", "cuda", DEVICE))


def _level_tensors():
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64, device=DEVICE)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def test_the_op_reads_no_level_tensor_given_host_sizes(fake_gpu):
    spatial_shapes, level_start_index = _level_tensors()
    value = torch.randn(2, 16, 2, 4, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    locations = torch.rand(2, 5, 2, 2, 3, 2, device=DEVICE, requires_grad=True)
    weights = torch.rand(2, 5, 2, 2, 3, device=DEVICE, requires_grad=True)
    output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, spatial_shapes_list=LEVELS)
    output.float().sum().backward()
    assert output.dtype == torch.bfloat16 and locations.grad.dtype == torch.float32
    # The control: without the host sizes the wrapper has to read the tensors (once per pair), and
    # on meta tensors that read raises: the test does detect host reads.
    with pytest.raises(HOST_READ_ERRORS, match="meta"):
        ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def test_msdeformattn_reads_no_tensor(fake_gpu):
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).to(DEVICE)
    spatial_shapes, level_start_index = _level_tensors()
    query = torch.randn(2, 5, 8, device=DEVICE)
    value = torch.randn(2, 16, 8, device=DEVICE, requires_grad=True)
    mask = torch.zeros(2, 16, dtype=torch.bool, device=DEVICE)
    for reference_points in (torch.rand(2, 5, 2, 2, device=DEVICE), torch.rand(2, 5, 2, 4, device=DEVICE)):
        output = module(query, reference_points, value, spatial_shapes, level_start_index, mask, spatial_shapes_list=LEVELS)
        output.sum().backward()
    assert value.grad is not None


@pytest.mark.parametrize("two_stage", [False, True], ids=["queries", "two_stage"])
def test_transformer_reads_no_tensor(fake_gpu, two_stage):
    """The whole transformer (encoder, two-stage proposals, refinement decoder), forward and
    backward. It reads the level sizes off the feature maps' shapes and passes them to every layer."""
    layer_args = dict(d_model=8, d_ffn=16, dropout=0.1, n_levels=2, n_heads=2, n_points=2)
    transformer = DeformableTransformer(
        DeformableEncoder(num_layers=2, **layer_args),
        DeformableDecoder(num_layers=2, **layer_args),
        d_model=8,
        num_levels=2,
        two_stage=two_stage,
        two_stage_num_proposals=6,
    ).to(DEVICE)
    box_heads = torch.nn.ModuleList(torch.nn.Linear(8, 4) for _ in range(2)).to(DEVICE)
    class_head = torch.nn.Linear(8, 3).to(DEVICE)
    features = [torch.randn(2, 8, h, w, device=DEVICE) for h, w in LEVELS]
    masks = [torch.zeros(2, h, w, dtype=torch.bool, device=DEVICE) for h, w in LEVELS]
    pos = [torch.randn(f.shape, device=DEVICE) for f in features]
    query_embed = None if two_stage else torch.randn(5, 16, device=DEVICE)
    outputs = transformer(features, masks, pos, query_embed, box_heads, class_head, box_heads[0] if two_stage else None)
    loss = outputs["hidden_states"].sum() + sum(r.sum() for r in outputs["references"])
    if two_stage:
        loss = loss + outputs["enc_logits"].sum() + outputs["enc_boxes"].sum()
    loss.backward()
