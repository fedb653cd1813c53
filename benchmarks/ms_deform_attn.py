#!/usr/bin/env python
"""Benchmark of the deformable-sampling op: compiled kernel against the grid_sample reference (and,
on CUDA, against the Triton kernels).

Deformable DETR shapes for an 800 x 1067 input (stride 8 to 64 levels 100x134, 50x67, 25x34, 13x17;
8 heads x 32 channels, 4 levels, 4 points):

* encoder: every one of the 17,821 pixels is a query, reference point = its pixel centre;
* decoder: 300 queries with random reference points.

Sampling locations are reference point + offsets of about two pixels of each level (normal noise), as
in a trained model, rather than uniform over the map; attention weights are a softmax over L * P.

For each case and implementation it times the forward (under no_grad) and forward + backward (median
of --repeats runs after one warm-up) and measures the peak memory they allocate beyond the inputs:
on CUDA with torch.cuda.max_memory_allocated, on CPU from the allocation events of the torch profiler
(running sum of allocated minus freed bytes, from its chrome trace). It prints a markdown table and writes it, with the
machine and the command, to benchmarks/results/ms_deform_attn_<device>.md (or --output).

    python benchmarks/ms_deform_attn.py --device cpu --repeats 5
    python benchmarks/ms_deform_attn.py --device cuda --repeats 20   # kernel, triton, reference

Implementations: "kernel" is ms_deform_attn with its default backend (the compiled extension),
"triton" is ms_deform_attn_triton (CUDA only: on the CPU it would run in Triton's interpreter), and
"reference" is ms_deform_attn_reference. Ratio rows give each one's time and memory over the
kernel's.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch

from deformable_family.layers import ms_deform_attn, ms_deform_attn_reference, ms_deform_attn_triton
from deformable_family.layers.ms_deform_attn_op import compiled_kernels

LEVEL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]  # 800 x 1067 input, strides 8, 16, 32, 64
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
DECODER_QUERIES = 300
OFFSET_PIXELS = 2.0
IMPLEMENTATIONS: Dict[str, Callable] = {
    "kernel": ms_deform_attn,
    "triton": ms_deform_attn_triton,
    "reference": ms_deform_attn_reference,
}


def select_implementations(device: torch.device, names=None) -> Dict[str, Callable]:
    """The implementations to time, "kernel" first (the ratios' denominator): by default all of
    IMPLEMENTATIONS on CUDA and all but "triton" on the CPU."""
    if names is None:
        names = [n for n in IMPLEMENTATIONS if device.type == "cuda" or n != "triton"]
    if "triton" in names and device.type != "cuda":
        raise ValueError(
            "--implementations triton needs --device cuda (on the CPU Triton only interprets)"
        )
    names = ["kernel"] + [n for n in names if n != "kernel"]
    return {name: IMPLEMENTATIONS[name] for name in names}


def make_case(stage: str, batch: int, device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_rows, num_levels = int(areas.sum()), len(LEVEL_SHAPES)
    if stage == "encoder":
        centres = []
        for height, width in LEVEL_SHAPES:
            ys, xs = torch.meshgrid(
                (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
            )
            centres.append(torch.stack([xs.flatten(), ys.flatten()], dim=-1))
        reference = torch.cat(centres)[None].expand(batch, -1, -1)  # (N, S, 2)
    else:
        reference = torch.rand(batch, DECODER_QUERIES, 2, generator=generator)
    num_queries = reference.shape[1]
    level_size = spatial_shapes.flip(-1).float()  # (L, 2) as (W, H)
    shape = (batch, num_queries, NUM_HEADS, num_levels, NUM_POINTS)
    offsets = torch.randn(*shape, 2, generator=generator) * OFFSET_PIXELS / level_size[:, None, :]
    locations = reference[:, :, None, None, None, :] + offsets
    logits = torch.randn(batch, num_queries, NUM_HEADS, num_levels * NUM_POINTS, generator=generator)
    weights = logits.softmax(-1).view(shape)
    value = torch.randn(batch, num_rows, NUM_HEADS, HEAD_DIM, generator=generator)
    grad_output = torch.randn(batch, num_queries, NUM_HEADS * HEAD_DIM, generator=generator)
    tensors = (value, spatial_shapes, level_start_index, locations, weights, grad_output)
    return tuple(t.to(device) for t in tensors)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(op: Callable, case, device) -> Callable[[], None]:
    value, spatial_shapes, level_start_index, locations, weights, _ = case

    def run():
        with torch.no_grad():
            op(value, spatial_shapes, level_start_index, locations, weights)
        _synchronize(device)

    return run


def _forward_backward(op: Callable, case, device) -> Callable[[], None]:
    value, spatial_shapes, level_start_index, locations, weights, grad_output = case
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]

    def run():
        output = op(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
        torch.autograd.grad(output, leaves, grad_output)
        _synchronize(device)

    return run


def median_ms(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def peak_mib(run: Callable[[], None], device: torch.device) -> float:
    """Peak memory allocated by run() beyond what existed before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    # Every CPU allocation (+bytes) and free (-bytes) is a "[memory]" event of the trace; the running
    # sum in event order is the memory held at each moment.
    with tempfile.TemporaryDirectory() as folder:
        trace_path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(trace_path)
        with open(trace_path) as f:
            trace = json.load(f)
    events = [e["args"] for e in trace["traceEvents"] if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    current = peak = 0
    for args in sorted(events, key=lambda a: a["Ev Idx"]):
        current += args["Bytes"]
        peak = max(peak, current)
    return peak / 2**20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(device: torch.device) -> List[str]:
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
        f"- compiled kernels: {compiled_kernels() or 'none (the op falls back to the reference)'}",
    ]
    if device.type == "cuda":
        import triton

        gpu = torch.cuda.get_device_name(device)
        lines.append(f"- GPU: {gpu}, CUDA {torch.version.cuda}, triton {triton.__version__}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=list(IMPLEMENTATIONS),
        default=None,
        help="what to time besides the kernel (default: all; triton only with --device cuda)",
    )
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/results/ms_deform_attn_<device>.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no GPU is visible")
    device = torch.device(args.device)
    if device.type not in compiled_kernels():
        print(f"warning: no compiled {device.type} kernel; 'kernel' rows measure the reference fallback")

    load_before = os.getloadavg()
    implementations = select_implementations(device, args.implementations)
    rows = []
    for stage in ("encoder", "decoder"):
        for batch in args.batch_sizes:
            case = make_case(stage, batch, device)
            measured = {}
            for name, op in implementations.items():
                measured[name] = (
                    median_ms(_forward(op, case, device), args.repeats),
                    median_ms(_forward_backward(op, case, device), args.repeats),
                    peak_mib(_forward(op, case, device), device),
                    peak_mib(_forward_backward(op, case, device), device),
                )
                print(f"{stage} batch {batch} {name}: " + ", ".join(f"{v:.1f}" for v in measured[name]), flush=True)
            rows.append((stage, batch, case[3].shape[1], measured))
            del case
    load_after = os.getloadavg()

    header = [
        "| case | batch | queries | impl | forward ms | fwd+bwd ms | forward peak MiB | fwd+bwd peak MiB |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    table = list(header)
    for stage, batch, num_queries, measured in rows:
        for name in implementations:
            values = " | ".join(f"{v:.1f}" for v in measured[name])
            table.append(f"| {stage} | {batch} | {num_queries} | {name} | {values} |")
        for name in list(implementations)[1:]:
            pairs = zip(measured[name], measured["kernel"])
            ratios = " | ".join(f"**{r / k:.1f}x**" for r, k in pairs)
            table.append(f"| {stage} | {batch} | {num_queries} | {name} / kernel | {ratios} |")

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    report = [
        f"# ms_deform_attn benchmark ({args.device})",
        "",
        f"Command (from the repository root): `{command}`",
        f"Recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *machine_lines(device),
        f"- load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)}: other processes may have been running, "
        "so the times are indicative; the ratios come from the same run.",
        "",
        f"Deformable DETR at 800 x 1067: levels {LEVEL_SHAPES}, {NUM_HEADS} heads x {HEAD_DIM} channels, "
        f"{NUM_POINTS} points; encoder queries = all pixels, decoder {DECODER_QUERIES} queries; locations "
        f"= reference + N(0, {OFFSET_PIXELS} px) offsets. Median of {args.repeats} runs after a warm-up; "
        "forward under no_grad; peak = memory allocated beyond the inputs "
        + ("(torch.cuda.max_memory_allocated)." if device.type == "cuda" else "(torch profiler allocation events)."),
        "",
        *table,
        "",
    ]
    text = "\n".join(report)
    print(text)
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"ms_deform_attn_{args.device}.md"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write(text)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
