"""Fuzz test of ms_deform_attn on the CPU against the reference.

Random shapes and levels (1x1 and empty ones included, no level at all), heads, odd and even
channels, points, batch 0 and queries 0, non-contiguous inputs, inf / nan / huge / negative
locations and locations on pixel centres and edges, every dtype (and float32 locations with a
16-bit value), with and without spatial_shapes_list, the op called directly or through
ms_deform_attn, and now and then one argument made invalid. Most values live inside a buffer that
holds nan just before and after them, so a read outside value shows as nan.
Each case either raises a ValueError / TypeError whose message names the argument at fault, or
matches the reference (output and the three gradients, tolerance per dtype) and never gives nan
where the reference is finite.

The cases run in a subprocess (this file run as a script), so a crash (an out-of-bounds read that
faults, an abort) fails the test instead of killing pytest. Seeded: a failure prints the case
number and its description; re-run one case with
``python tests/layers/test_ms_deform_attn_fuzz.py --seed SEED --first CASE --cases 1``.
"""
import argparse
import os
import random
import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

SEED = 11
# 3000 cases took 18.4 s of CPU time on the shared 2-core machine, interpreter start-up included:
# well inside a minute on a quiet 2-core machine.
NUM_CASES = 3000
TIMEOUT_S = 600

DTYPES = ("float64", "float32", "float16", "bfloat16")
# Relative to the largest |reference| of the compared tensor (at least 1). The reference runs in
# float64 on the same (rounded) inputs; the 16-bit kernels compute in float32 and round once to the
# output dtype.
TOLERANCE = {"float64": 1e-9, "float32": 5e-5, "float16": 2e-3, "bfloat16": 1e-2}
SPECIAL = (float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9, -3e9, 1e300)
# One argument made invalid: (what is done, a pattern the error message must contain, naming the
# argument at fault, and the exception type).
CORRUPTIONS = (
    ("value int64", "ms_deform_attn: value must be float32", TypeError),
    ("value rank 3", r"ms_deform_attn: value must be \(N, S, M, D\)", ValueError),
    ("value one row more", r"but value has S = \d+", ValueError),
    ("spatial_shapes int32", "ms_deform_attn: spatial_shapes must be int64", TypeError),
    ("spatial_shapes negative", r"ms_deform_attn: spatial_shapes(_list .* differs from spatial_shapes|\[\d+\] = \(-)", ValueError),
    ("spatial_shapes rank 1", r"ms_deform_attn: spatial_shapes must be \(L, 2\)", ValueError),
    ("level_start_index shifted", r"ms_deform_attn: level_start_index\[1\] = \d+ is inconsistent", ValueError),
    ("level_start_index one level more", r"ms_deform_attn: level_start_index must be \(L,\)", ValueError),
    ("sampling_locations float64 with float32 value", "ms_deform_attn: sampling_locations has dtype (torch.float64|Double)", TypeError),
    ("sampling_locations one point more", "to match sampling_locations", ValueError),
    ("attention_weights one query more", r"ms_deform_attn: attention_weights must be \(N, Lq, M, L, P\)", ValueError),
    ("attention_weights int64", "ms_deform_attn: attention_weights has dtype (torch.int64|Long)", TypeError),
    ("spatial_shapes_list wrong", r"ms_deform_attn: spatial_shapes_list (describe sum|.* differs)", ValueError),
    ("spatial_shapes_list not ints", "ms_deform_attn: spatial_shapes_list must hold", TypeError),
)


def test_fuzz_against_the_reference_in_a_subprocess():
    import pytest

    from deformable_family.layers.ms_deform_attn_op import compiled_kernels

    if "cpu" not in compiled_kernels():
        pytest.skip("deformable_family._C (the compiled CPU kernel) is not built")
    command = [sys.executable, os.path.abspath(__file__), "--seed", str(SEED), "--cases", str(NUM_CASES)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the fuzz process did not finish in {TIMEOUT_S} s (a hang?):\n{e.stdout}\n{e.stderr}")
    output = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"the fuzz process failed (exit status {result.returncode}; negative: killed by that signal):\n{output}"
    assert f"{NUM_CASES} cases passed" in result.stdout, output


# ----------------------------------------------------------------------------------------------
# The fuzzer itself (run in the subprocess).


def _random_levels(rng: random.Random) -> List[Tuple[int, int]]:
    num_levels = rng.choice((0, 1, 1, 2, 2, 3, 3, 4))
    levels = []
    for _ in range(num_levels):
        kind = rng.random()
        if kind < 0.15:
            levels.append(rng.choice(((0, rng.randint(0, 4)), (rng.randint(1, 4), 0), (0, 0))))
        elif kind < 0.3:
            levels.append((1, 1))
        else:
            levels.append((rng.randint(1, 7), rng.randint(1, 7)))
    return levels


def _random_locations(torch, rng: random.Random, generator, shape, levels) -> "torch.Tensor":
    """Uniform in [-0.3, 1.3], with some coordinates on pixel centres / edges of their level and some
    non-finite, huge or far negative."""
    locations = torch.rand(shape, generator=generator, dtype=torch.float64) * 1.6 - 0.3
    flat = locations.view(-1, shape[3], shape[4], 2) if locations.numel() else None
    if flat is None:
        return locations
    for _ in range(rng.randint(0, 6)):
        index = rng.randrange(flat.shape[0])
        level = rng.randrange(shape[3])
        point = rng.randrange(shape[4])
        axis = rng.randrange(2)
        size = levels[level][1 - axis]  # x is divided by W, y by H
        choice = rng.random()
        if choice < 0.5 and size > 0:
            flat[index, level, point, axis] = rng.randint(-1, 2 * size + 1) / (2 * size)  # centres and edges
        elif choice < 0.8:
            flat[index, level, point, axis] = rng.choice(SPECIAL)
        else:
            flat[index, level, point, axis] = rng.choice((0.0, 1.0, -1.0, 2.0, 0.5))
    return locations


def _nan_guarded(torch, tensor):
    """A contiguous copy of tensor inside a larger buffer that holds nan just before and just after
    it: a read outside the tensor's extent turns into nan."""
    guard = max(1, tensor[0, 0].numel() if tensor.shape[0] * tensor.shape[1] else 1) * 2
    buffer = torch.full((guard + tensor.numel() + guard,), float("nan"), dtype=tensor.dtype)
    inside = buffer[guard : guard + tensor.numel()].view(tensor.shape)
    inside.copy_(tensor)
    return inside


def _non_contiguous(torch, tensor, rng: random.Random):
    """The same values in another memory layout (or the tensor itself)."""
    if tensor.dim() < 2 or rng.random() < 0.6:
        return tensor
    if rng.random() < 0.5:
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    return torch.stack([tensor, tensor], dim=-1)[..., 0]  # a strided view


def _make_case(torch, case: int, seed: int):
    rng = random.Random(seed * 1_000_003 + case)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + case)
    dtype_name = rng.choice(DTYPES)
    dtype = getattr(torch, dtype_name)
    levels = _random_levels(rng)
    batch = rng.choice((0, 1, 1, 2, 2, 3))
    num_queries = rng.choice((0, 1, 2, 3, 5, 6))
    num_heads = rng.randint(1, 3)
    head_dim = rng.choice((1, 2, 3, 4, 5, 7, 8, 9))
    num_points = rng.choice((1, 1, 2, 3, 4))
    num_levels = len(levels)
    num_rows = sum(h * w for h, w in levels)
    value = torch.randn(batch, num_rows, num_heads, head_dim, generator=generator, dtype=torch.float64)
    locations = _random_locations(torch, rng, generator, (batch, num_queries, num_heads, num_levels, num_points, 2), levels)
    weights = torch.randn(batch, num_queries, num_heads, num_levels, num_points, generator=generator, dtype=torch.float64)
    coordinate_dtype = dtype
    if dtype_name in ("float16", "bfloat16") and rng.random() < 0.5:
        coordinate_dtype = torch.float32
    value, locations, weights = value.to(dtype), locations.to(coordinate_dtype), weights.to(coordinate_dtype)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]) if num_levels else areas.clone()
    value, locations, weights = (_non_contiguous(torch, t, rng) for t in (value, locations, weights))
    guarded = value.is_contiguous() and rng.random() < 0.7
    if guarded:  # any read outside value's extent would give nan
        value = _nan_guarded(torch, value)
    spatial_shapes_list: Optional[list] = [list(level) for level in levels] if rng.random() < 0.5 else None
    description = (
        f"dtype {dtype_name}, locations {str(coordinate_dtype)[6:]}, levels {levels}, N {batch}, Lq {num_queries}, "
        f"M {num_heads}, D {head_dim}, P {num_points}, spatial_shapes_list {'given' if spatial_shapes_list else 'no'}, "
        f"value {'nan-guarded' if guarded else 'contiguous' if value.is_contiguous() else 'non-contiguous'}"
    )
    inputs = [value, spatial_shapes, level_start_index, locations, weights]
    corruption = None
    if rng.random() < 0.15:
        corruption = _corrupt(torch, rng, inputs, levels, dtype_name)
        if corruption is not None:
            if corruption[0].startswith("spatial_shapes_list"):
                spatial_shapes_list = inputs.pop()
            description += f"; invalid: {corruption[0]}"
    # A third of the calls go to the registered op itself: no Python checks, only the C++ ones.
    direct = spatial_shapes_list is None and rng.random() < 0.3
    if direct:
        description += "; the op called directly"
    return inputs, spatial_shapes_list, description, corruption, dtype_name, direct


def _corrupt(torch, rng: random.Random, inputs, levels, dtype_name):
    """Makes one argument invalid; returns its CORRUPTIONS entry, or None when the case has no room
    for the chosen one (e.g. no level to shift)."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    name, pattern, error = rng.choice(CORRUPTIONS)
    num_levels = len(levels)
    if name == "value int64":
        inputs[0] = value.to(torch.int64)
    elif name == "value rank 3":
        inputs[0] = value.flatten(2)
    elif name == "value one row more":
        inputs[0] = torch.cat([value, value.new_zeros(value.shape[0], 1, *value.shape[2:])], 1)
    elif name == "spatial_shapes int32":
        inputs[1] = spatial_shapes.to(torch.int32)
    elif name == "spatial_shapes negative":
        if num_levels == 0 or all(h * w == 0 for h, w in levels):
            return None
        level = next(i for i, (h, w) in enumerate(levels) if h * w > 0)
        shapes = spatial_shapes.clone()
        shapes[level] = -shapes[level]  # (-H) * (-W) = H * W: the row count still matches
        inputs[1] = shapes
    elif name == "spatial_shapes rank 1":
        inputs[1] = spatial_shapes.reshape(-1)
    elif name == "level_start_index shifted":
        if num_levels < 2 or levels[0][0] * levels[0][1] == 0:
            return None
        starts = level_start_index.clone()
        starts[1] += 1
        inputs[2] = starts
    elif name == "level_start_index one level more":
        inputs[2] = torch.cat([level_start_index, level_start_index.new_zeros(1)])
    elif name == "sampling_locations float64 with float32 value":
        if dtype_name != "float32":
            return None
        inputs[3] = locations.double()
    elif name == "sampling_locations one point more":
        inputs[3] = torch.cat([locations, locations[..., :1, :]], 4)
    elif name == "attention_weights one query more":
        inputs[4] = torch.cat([weights, weights.new_zeros(weights.shape[0], 1, *weights.shape[2:])], 1)
    elif name == "attention_weights int64":
        inputs[4] = weights.to(torch.int64)
    elif name == "spatial_shapes_list wrong":
        if num_levels == 0:
            return None
        inputs.append([[h + 1, w] for h, w in levels])
    elif name == "spatial_shapes_list not ints":
        if num_levels == 0:
            return None
        inputs.append([[float(h), w] for h, w in levels])
    return name, pattern, error


def _forward_and_grads(torch, op, inputs, spatial_shapes_list, grad_seed: int, grad_dtype=None):
    """(output, grad_value, grad_locations, grad_weights); grad_output is random, rounded to
    grad_dtype (the kernel's output dtype, so that the reference gets the same values) if given."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # detach(), not clone(): the kernel must see the inputs' own (possibly non-contiguous) layout.
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in (value, locations, weights)]
    kwargs = {} if spatial_shapes_list is None else {"spatial_shapes_list": spatial_shapes_list}
    output = op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2], **kwargs)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    grad_output = grad_output.to(grad_dtype or output.dtype).to(output.dtype)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return (output.detach(),) + tuple(grads)


def _near_a_kink(torch, locations, spatial_shapes, tolerance: float):
    """(N, Lq, M, L, P, 2) bool: the pixel coordinate of that component is within tolerance of an
    integer, where bilinear interpolation has a kink (and the sampled-or-not border at -1 and W/H):
    the one-sided derivatives differ there, so kernel and reference may each pick a side."""
    sizes = spatial_shapes.flip(-1).to(torch.float64)[None, None, None, :, None, :]  # (W, H) per level
    pixel = locations.to(torch.float64) * sizes - 0.5
    return (pixel - pixel.round()).abs() <= tolerance * pixel.abs().clamp_min(1)


def run_cases(seed: int, first: int, count: int) -> int:
    import torch

    from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference

    def direct_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.ops.deformable_family.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    start = time.time()
    counts = {"matched": 0, "raised": 0}
    for case in range(first, first + count):
        inputs, spatial_shapes_list, description, corruption, dtype_name, direct = _make_case(torch, case, seed)
        op = direct_op if direct else ms_deform_attn
        where = f"case {case} (seed {seed}): {description}"
        if corruption is not None:
            name, pattern, error = corruption
            try:
                _forward_and_grads(torch, op, inputs, spatial_shapes_list, case)
            except (TypeError, ValueError) as e:
                assert isinstance(e, error), f"{where}: raised {type(e).__name__} instead of {error.__name__}: {e}"
                assert re.search(pattern, str(e)), f"{where}: the message does not match {pattern!r}: {e}"
                counts["raised"] += 1
                continue
            raise AssertionError(f"{where}: no error")
        actual = _forward_and_grads(torch, op, inputs, spatial_shapes_list, case)
        exact = [t.double() if t.is_floating_point() else t for t in inputs]
        expected = _forward_and_grads(
            torch, ms_deform_attn_reference, exact, spatial_shapes_list, case, grad_dtype=inputs[0].dtype
        )
        value, spatial_shapes, _, locations, weights = inputs
        kink = _near_a_kink(torch, locations, spatial_shapes, 1e-9 if dtype_name == "float64" else 1e-4)
        for name, a, e, dtype in zip(
            ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights"),
            actual,
            expected,
            (value.dtype, value.dtype, locations.dtype, weights.dtype),
        ):
            assert a.shape == e.shape and a.dtype == dtype, f"{where}: {name} has shape {tuple(a.shape)}, dtype {a.dtype}"
            a = a.double()
            finite = torch.isfinite(e)
            assert not (torch.isnan(a) & finite).any(), f"{where}: {name} is nan where the reference is finite"
            assert finite.all(), f"{where}: the reference's {name} is not finite"
            if name == "grad_sampling_locations":
                a, e = a[~kink], e[~kink]
            if e.numel() == 0:
                continue
            # Inputs are of order 1: an absolute floor of 1 keeps a tensor whose entries are all tiny
            # (samples cut off at a map border, where the weight goes continuously to 0 and the
            # kernel's float32 border test and the float64 reference may disagree) from counting
            # rounding noise as a large relative error.
            scale = max(float(e.abs().max()), 1.0)
            error = float((a - e).abs().max()) / scale
            assert error <= TOLERANCE[dtype_name], f"{where}: {name} relative error {error:.3g} > {TOLERANCE[dtype_name]}"
        counts["matched"] += 1
    elapsed = time.time() - start
    print(f"{count} cases passed ({counts['matched']} matched the reference, {counts['raised']} raised as expected) in {elapsed:.1f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--cases", type=int, default=NUM_CASES)
    args = parser.parse_args()
    return run_cases(args.seed, args.first, args.cases)


if __name__ == "__main__":
    sys.exit(main())
