#!/usr/bin/env python
"""Print the training curve of DSCT quickstart runs (loss every 100 iterations, mAP at every
evaluation) from their metrics.json, as a markdown table per run, and the final mean AP of the
emotions by the evidence they follow (own head, scene and objects, other persons).

    python train_net.py --config-file configs/quickstart/dsct_synthetic.py train.output_dir=out/ssra
    python train_net.py --config-file configs/quickstart/dsct_synthetic.py train.output_dir=out/no_ssra \
        model.transformer.decoder.post_cross_attn.num_spatial=0
    python benchmarks/dsct_quickstart_curve.py out/ssra out/no_ssra
"""

import json
import os
import sys


def read_metrics(output_dir: str):
    rows = []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def curve(rows):
    losses = {row["iteration"]: row["total_loss"] for row in rows if "total_loss" in row}
    maps = {row["iteration"]: row for row in rows if "emotic/mAP" in row}
    table = [
        "| iteration | total loss | mAP | chance | mAP by persons 1/2/3/4 |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for iteration in sorted(set(losses) | set(maps)):
        if iteration not in maps and (iteration + 1) % 100:
            continue
        loss = losses.get(iteration)
        result = maps.get(iteration, {})
        groups = "/".join(
            f"{result[f'emotic/mAP-persons={n}']:.1f}"
            for n in (1, 2, 3, 4)
            if f"emotic/mAP-persons={n}" in result
        )
        table.append(
            f"| {iteration + 1} | {'' if loss is None else f'{loss:.2f}'} | "
            f"{result.get('emotic/mAP', float('nan')):.2f} | {result.get('emotic/mAP-chance', float('nan')):.2f} | {groups} |"
            if result
            else f"| {iteration + 1} | {loss:.2f} | | | |"
        )
    return "\n".join(table)


def by_evidence(rows) -> str:
    """Mean AP of the last evaluation per kind of evidence of the synthetic labels."""
    from deformable_family.data.synthetic_emotions import EMOTION_RULES

    last = [row for row in rows if "emotic/mAP" in row][-1]
    parts = []
    for kind in ("appearance", "scene", "others"):
        names = [name for name, (rule_kind, _) in EMOTION_RULES.items() if rule_kind == kind]
        values = [last[f"emotic/AP-{name}"] for name in names]
        parts.append(f"{kind} ({len(names)}): {sum(values) / len(values):.1f}")
    return f"final mean AP by evidence: {', '.join(parts)}"


if __name__ == "__main__":
    for output_dir in sys.argv[1:]:
        rows = read_metrics(output_dir)
        print(f"### {output_dir}\n\n{curve(rows)}\n\n{by_evidence(rows)}\n")
