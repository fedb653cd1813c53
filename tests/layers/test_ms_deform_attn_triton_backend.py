"""The Triton backend of ms_deform_attn without a GPU: its kernel tests run in Triton's interpreter in a
subprocess, and the backend choice (argument, MSDeformAttn, config) is checked here.

triton 3.x reads TRITON_INTERPRET when a kernel is defined (in ``triton.jit``), so the interpreter
cannot be switched on reliably inside a process that may already have defined the kernels: the kernel
tests (test_ms_deform_attn_triton.py) run in a fresh Python process with TRITON_INTERPRET=1.
"""

import importlib
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from deformable_family.layers import MSDeformAttn, ms_deform_attn, ms_deform_attn_triton
from deformable_family.layers.ms_deform_attn_op import ATTN_BACKENDS
from deformable_family.modeling.deformable_detr import DeformableDecoder, DeformableEncoder

if __package__:
    from .test_ms_deform_attn import make_inputs
else:
    from test_ms_deform_attn import make_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
KERNEL_TESTS = os.path.join(HERE, "test_ms_deform_attn_triton.py")


def _triton_state():
    """None when triton is missing, else whether the kernels run interpreted in this process."""
    from deformable_family.layers.ms_deform_attn_triton import triton_interpreted

    try:
        return triton_interpreted()
    except RuntimeError:
        return None


requires_triton = pytest.mark.skipif(_triton_state() is None, reason="triton is not installed")


@requires_triton
def test_kernels_match_reference_in_the_interpreter():
    """Every test of test_ms_deform_attn_triton.py passes on CPU tensors in Triton's interpreter:
    the forward and backward kernels against the reference, and MSDeformAttn switched by config."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", KERNEL_TESTS]
    try:
        # Under the suite's per-test limit (600 s), so a slow run fails here with its output.
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"the interpreter tests did not finish in {e.timeout} s:\n{e.stdout}\n{e.stderr}"
        )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-12000:]}"
    passed = re.search(r"(\d+) passed", summary)
    # A skip would mean the kernels did not run (no interpreter, no triton): not a pass.
    assert passed and "skipped" not in summary and "deselected" not in summary, output[-4000:]


# Element types of the kernels' pointer arguments: "value" and "location" stand for the dtypes of value
# and of sampling_locations / attention_weights.
POINTER_TYPES = {
    "value_ptr": "value",
    "output_ptr": "value",
    "grad_output_ptr": "value",
    "locations_ptr": "location",
    "weights_ptr": "location",
    "grad_locations_ptr": "location",
    "grad_weights_ptr": "location",
    "grad_value_ptr": "fp32",
    "spatial_shapes_ptr": "i64",
    "level_start_index_ptr": "i64",
}


@requires_triton
@pytest.mark.skipif(_triton_state() is True, reason="Triton's interpreter is on in this process")
@pytest.mark.parametrize(
    "arch,value_type,location_type",
    [(90, "fp32", "fp32"), (90, "bf16", "fp32"), (90, "fp16", "fp16"), (80, "fp32", "fp32")],
)
def test_kernels_compile_for_the_gpu(arch, value_type, location_type):
    """Both kernels compile to a cubin for sm_80 / sm_90 without a GPU (Triton's own compiler and the
    ptxas it ships): what the interpreter cannot check (typing, layouts, lowering). Arguments are
    specialised as the launcher would for Deformable DETR (head_dim 32, aligned tensors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    op = importlib.import_module("deformable_family.layers.ms_deform_attn_triton")
    kernels = op._kernels()
    head_dim = 32
    types = {"value": value_type, "location": location_type}
    for kernel, tile in (
        (kernels.ms_deform_attn_forward_kernel, op._FORWARD_TILE),
        (kernels.ms_deform_attn_backward_kernel, op._BACKWARD_TILE),
    ):
        block_q, block_d, _ = op._launch_shape(1000, head_dim, tile)
        signature, attrs = {}, {}
        for index, name in enumerate(kernel.arg_names):
            if name in ("BLOCK_Q", "BLOCK_D"):
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                pointee = POINTER_TYPES[name]
                signature[name] = "*" + types.get(pointee, pointee)
                attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
            else:
                signature[name] = "i32"
        attrs[(kernel.arg_names.index("head_dim"),)] = [["tt.divisibility", 16]]
        source = ASTSource(
            kernel, signature, constexprs={"BLOCK_Q": block_q, "BLOCK_D": block_d}, attrs=attrs
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        name = kernel.fn.__name__
        assert compiled.asm["cubin"] and f".entry {name}" in compiled.asm["ptx"], name


@requires_triton
@pytest.mark.skipif(_triton_state() is True, reason="Triton's interpreter is on in this process")
def test_cpu_tensors_without_the_interpreter_point_at_ms_deform_attn():
    inputs = make_inputs(1, [(3, 4)], 2, 4, 3, 2, dtype=torch.float32)
    with pytest.raises(
        RuntimeError, match="TRITON_INTERPRET=1.*deformable_family.layers.ms_deform_attn"
    ):
        ms_deform_attn_triton(*inputs)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ms_deform_attn(*inputs, backend="triton")


def test_unknown_backends_are_rejected_by_name():
    inputs = make_inputs(1, [(3, 4)], 2, 4, 3, 2, dtype=torch.float32)
    assert ATTN_BACKENDS == ("extension", "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*inputs, backend="cuda")
    with pytest.raises(
        ValueError, match="MSDeformAttn: attn_backend must be one of .* got 'Triton'"
    ):
        MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1, attn_backend="Triton")
    with pytest.raises(ValueError, match="attn_backend"):
        DeformableDecoder(
            num_layers=1, d_model=8, d_ffn=8, n_levels=1, n_heads=2, attn_backend="cpp"
        )


def test_encoder_and_decoder_pass_the_backend_to_every_msdeformattn():
    sizes = dict(num_layers=2, d_model=8, d_ffn=8, n_levels=1, n_heads=2)
    for stage in (DeformableEncoder, DeformableDecoder):
        for backend in ATTN_BACKENDS:
            module = stage(**sizes, attn_backend=backend)
            assert [m.attn_backend for m in module.modules() if isinstance(m, MSDeformAttn)] == [
                backend
            ] * 2
        default = stage(**sizes)
        assert [m.attn_backend for m in default.modules() if isinstance(m, MSDeformAttn)] == [
            "extension"
        ] * 2


def _quickstart_model(overrides):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "quickstart", "deformable_detr_shapes.py"))
    return cfg, instantiate(LazyConfig.apply_overrides(cfg, overrides).model)


def test_config_selects_the_backend_per_stage():
    """The config fields model.transformer.{encoder,decoder}.attn_backend (default "extension")
    reach every MSDeformAttn of their stage only; without a GPU and without the interpreter, a model
    configured for Triton fails at its first Triton attention with the error naming the CPU path."""
    cfg, model = _quickstart_model([])
    assert cfg.model.transformer.encoder.attn_backend == "extension"
    assert cfg.model.transformer.decoder.attn_backend == "extension"
    assert {m.attn_backend for m in model.modules() if isinstance(m, MSDeformAttn)} == {"extension"}

    for stage, other in (("encoder", "decoder"), ("decoder", "encoder")):
        _, model = _quickstart_model([f"model.transformer.{stage}.attn_backend=triton"])
        chosen = getattr(model.transformer, stage).modules()
        assert {m.attn_backend for m in chosen if isinstance(m, MSDeformAttn)} == {"triton"}
        kept = getattr(model.transformer, other).modules()
        assert {m.attn_backend for m in kept if isinstance(m, MSDeformAttn)} == {"extension"}
    # model: the decoder samples with Triton, after an encoder on the compiled kernel.
    if _triton_state() is False and not torch.cuda.is_available():
        images, mask = torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
        with pytest.raises(RuntimeError, match="ms_deform_attn_triton: the inputs are cpu tensors"):
            model.eval().forward_outputs(images, mask)


def test_yacs_config_selects_the_backend_per_stage():
    """The yacs route: MODEL.DEFORMABLE_DETR.{ENC,DEC}_ATTN_BACKEND, default "extension"."""
    from detectron2.config import get_cfg

    from deformable_family.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    assert (
        cfg.MODEL.DEFORMABLE_DETR.ENC_ATTN_BACKEND,
        cfg.MODEL.DEFORMABLE_DETR.DEC_ATTN_BACKEND,
    ) == (
        "extension",
        "extension",
    )
    cfg.MODEL.DEFORMABLE_DETR.DEC_ATTN_BACKEND = "triton"
    with torch.device("meta"):  # full size without memory
        model = META_ARCH_REGISTRY.get("DeformableDETR")(cfg)
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    assert {m.attn_backend for m in encoder.modules() if isinstance(m, MSDeformAttn)} == {
        "extension"
    }
    assert {m.attn_backend for m in decoder.modules() if isinstance(m, MSDeformAttn)} == {"triton"}


def test_the_triton_wrapper_reads_no_tensor_on_the_host_given_host_sizes(monkeypatch):
    """Like the compiled op, the Triton path reads no level tensor on the host when given
    spatial_shapes_list (no GPU synchronisation). Shown on "meta" tensors, whose values cannot be
    read, with the kernel launches recorded instead of run."""
    op = importlib.import_module("deformable_family.layers.ms_deform_attn_triton")
    launches = []

    class RecordingKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid))

    kernels = types.SimpleNamespace(
        ms_deform_attn_forward_kernel=RecordingKernel("forward"),
        ms_deform_attn_backward_kernel=RecordingKernel("backward"),
    )
    monkeypatch.setattr(op, "_kernels", lambda: kernels)
    monkeypatch.setattr(op, "triton_interpreted", lambda: False)
    monkeypatch.setattr(op, "_check_runnable", lambda device: None)
    levels = [(3, 4), (2, 2)]
    spatial_shapes = torch.tensor(levels, device="meta")
    level_start_index = torch.tensor([0, 12], device="meta")
    value = torch.randn(2, 16, 2, 4, device="meta", dtype=torch.bfloat16, requires_grad=True)
    locations = torch.rand(2, 5, 2, 2, 3, 2, device="meta", requires_grad=True)
    weights = torch.rand(2, 5, 2, 2, 3, device="meta", requires_grad=True)
    args = (value, spatial_shapes, level_start_index, locations, weights)
    output = ms_deform_attn(*args, spatial_shapes_list=levels, backend="triton")
    output.float().sum().backward()
    assert [name for name, _ in launches] == ["forward", "backward"]
    assert output.shape == (2, 5, 8) and output.dtype == torch.bfloat16
    assert value.grad.dtype == torch.bfloat16 and locations.grad.dtype == torch.float32
    # The control: without the host sizes the level tensors are read, which fails on meta tensors.
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        ms_deform_attn(*args, backend="triton")
