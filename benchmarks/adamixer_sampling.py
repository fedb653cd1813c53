#!/usr/bin/env python
"""Benchmark of one AdaMixer stage's 3D sampling: on the family's op against the authors' way.

R50 1x shapes: an 800 x 1333 input padded to 800 x 1344, C2-C5 maps of 256 channels at strides
4-32 (200 x 336, 100 x 168, 50 x 84, 25 x 42), 100 queries, 4 groups of 32 points. Points are
spread over each query's box as after training (box centres uniform over the image, sizes 32-512 px,
offsets N(0, 0.5) box sizes, scale offsets N(-1, 0.5)).

* ours: ``deformable_family.modeling.adamixer.sample_3d`` (one ``ms_deform_attn`` call: points
  folded into queries, level weights as attention weights) on the maps in the op's layout. The model
  builds that layout once per batch (``flatten_levels``: a concatenation and a transpose) and shares
  it between its 6 stages, so it is timed on its own and added once to the 6-stage total;
* authors: one ``grid_sample`` per level on (B * G, 64, H_l, W_l), multiplied by the level weights
  and summed, as ``sampling_3d`` in their code (no layout change: their maps are viewed as groups).

For each batch size it times the forward (under no_grad) and the forward + backward (gradients of
the maps, the positions and the scales), median of --repeats runs after one warm-up, and writes a
markdown table with the machine and the command to benchmarks/results/adamixer_sampling_<device>.md
(or --output).

    python benchmarks/adamixer_sampling.py --device cpu --repeats 5
"""
import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

from deformable_family.layers.ms_deform_attn_op import compiled_kernels
from deformable_family.modeling.adamixer import FeatureLevels, flatten_levels, sample_3d

STRIDES = (4, 8, 16, 32)
PADDED = (800, 1344)  # 800 x 1333 padded to a multiple of 32
CHANNELS, NUM_GROUPS, NUM_POINTS, NUM_QUERIES = 256, 4, 32, 100


def make_case(batch: int, device: torch.device, seed: int = 0):
    """(maps, points_xy, points_z, grad_output) at the R50 1x shapes."""
    generator = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(batch, CHANNELS, PADDED[0] // s, PADDED[1] // s, generator=generator)
        for s in STRIDES
    ]
    centres = torch.rand(batch, NUM_QUERIES, 1, 1, 2, generator=generator) * torch.tensor(
        [1333.0, 800.0]
    )
    log_size = torch.rand(batch, NUM_QUERIES, 1, 1, 1, generator=generator) * 4 + 5  # 32-512 px
    shape = (batch, NUM_QUERIES, NUM_GROUPS, NUM_POINTS)
    offsets = torch.randn(*shape, 2, generator=generator) * 0.5
    points_xy = centres + offsets * 2.0 ** log_size
    points_z = log_size[..., 0] + torch.randn(*shape, generator=generator) * 0.5 - 1
    grad_output = torch.randn(*shape, CHANNELS // NUM_GROUPS, generator=generator)
    return (
        [t.to(device) for t in maps],
        points_xy.to(device),
        points_z.to(device),
        grad_output.to(device),
    )


def ours(features: FeatureLevels, points_xy: torch.Tensor, points_z: torch.Tensor) -> torch.Tensor:
    """One stage's sampling on the maps already in the op's layout (``flatten_levels``)."""
    return sample_3d(features, points_xy, points_z)


def authors(
    maps: Sequence[torch.Tensor], points_xy: torch.Tensor, points_z: torch.Tensor
) -> torch.Tensor:
    """A grid_sample per level over (B * G, C / G, H, W), weighted and summed (their sampling_3d)."""
    batch, num_queries, groups, points, _ = points_xy.shape
    channels = maps[0].shape[1] // groups
    log2_strides = torch.tensor([math.log2(s) for s in STRIDES], device=points_xy.device)
    weights = torch.softmax(-((points_z[..., None] - log2_strides) ** 2) / 2, dim=-1)
    grid_points = points_xy.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*G, N, P, 2)
    level_weights = weights.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*G, N, P, L)
    out = points_xy.new_zeros(batch * groups, channels, num_queries, points)
    for level, (feature, stride) in enumerate(zip(maps, STRIDES)):
        height, width = feature.shape[-2:]
        extent = points_xy.new_tensor([width * stride, height * stride])
        grid = grid_points / extent * 2 - 1
        value = feature.reshape(batch * groups, channels, height, width)
        sampled = F.grid_sample(
            value, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out = out + sampled * level_weights[None, ..., level].transpose(0, 1)
    return out.view(batch, groups, channels, num_queries, points).permute(0, 3, 1, 4, 2)


def median_ms(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    rows = []
    for batch in args.batch:
        maps, points_xy, points_z, grad_output = make_case(batch, device)
        features = flatten_levels(maps, STRIDES, NUM_GROUPS)
        torch.testing.assert_close(
            ours(features, points_xy, points_z),
            authors(maps, points_xy, points_z),
            rtol=1e-4,
            atol=1e-4,
        )

        def timed(function, inputs, output_grad):
            """(forward ms, forward + backward ms) of function(*inputs), gradients of all inputs."""
            leaves = [t.detach().requires_grad_() for t in inputs]

            def forward():
                with torch.no_grad():
                    function(*inputs)

            def forward_backward():
                torch.autograd.grad(function(*leaves), leaves, output_grad)

            return median_ms(forward, args.repeats), median_ms(forward_backward, args.repeats)

        def ours_from_value(value, xy, z):
            return ours(features._replace(value=value), xy, z)

        def authors_from_maps(*tensors):
            return authors(list(tensors[:-2]), tensors[-2], tensors[-1])

        def flatten_value(*tensors):
            return flatten_levels(list(tensors), STRIDES, NUM_GROUPS).value

        inputs = [points_xy, points_z]
        ours_stage = timed(ours_from_value, [features.value] + inputs, grad_output)
        flatten = timed(flatten_value, maps, torch.randn_like(features.value))
        theirs_stage = timed(authors_from_maps, maps + inputs, grad_output)
        ours_total = tuple(f + 6 * o for f, o in zip(flatten, ours_stage))
        theirs_total = tuple(6 * t for t in theirs_stage)
        rows += [
            f"| {batch} | one stage | ours: sample_3d on the op's layout | {ours_stage[0]:.1f} | {ours_stage[1]:.1f} |",
            f"| {batch} | one stage | authors: grid_sample per level | {theirs_stage[0]:.1f} | {theirs_stage[1]:.1f} |",
            f"| {batch} | one stage | authors / ours | **{theirs_stage[0] / ours_stage[0]:.1f}x** | **{theirs_stage[1] / ours_stage[1]:.1f}x** |",
            f"| {batch} | once per batch | ours: flatten_levels (layout for the op) | {flatten[0]:.1f} | {flatten[1]:.1f} |",
            f"| {batch} | 6 stages | ours: flatten once + 6 x sample_3d | {ours_total[0]:.1f} | {ours_total[1]:.1f} |",
            f"| {batch} | 6 stages | authors: 6 x grid_sample per level | {theirs_total[0]:.1f} | {theirs_total[1]:.1f} |",
            f"| {batch} | 6 stages | authors / ours | **{theirs_total[0] / ours_total[0]:.1f}x** | **{theirs_total[1] / ours_total[1]:.1f}x** |",
        ]
    load_after = os.getloadavg()
    command = "python benchmarks/adamixer_sampling.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    lines = [
        f"# AdaMixer 3D sampling benchmark ({device.type})",
        "",
        f"Command (from the repository root, PYTHONPATH=projects): `{command.strip()}`",
        f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, compiled kernels {compiled_kernels()}",
        f"- load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after "
        f"{tuple(round(v, 2) for v in load_after)}: when it is above 0 other processes were running, so the "
        "times are indicative; the ratios come from the same run.",
        "",
        f"One stage of AdaMixer R50 1x: {NUM_QUERIES} queries x {NUM_GROUPS} groups x {NUM_POINTS} points, "
        f"maps {[(PADDED[0] // s, PADDED[1] // s) for s in STRIDES]} x {CHANNELS} channels (800 x 1333 "
        f"padded to {PADDED[0]} x {PADDED[1]}). Median of {args.repeats} runs after a warm-up; forward under "
        "no_grad; fwd+bwd = gradients of the maps, positions and scales. The two agree to 1e-4 (checked "
        "before timing).",
        "",
        "| batch | scope | impl | forward ms | fwd+bwd ms |",
        "| ---: | --- | --- | ---: | ---: |",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"adamixer_sampling_{device.type}.md"
    )
    with open(output, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
