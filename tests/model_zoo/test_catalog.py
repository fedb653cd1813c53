"""The model-zoo table: complete, consistent with the configs, and the README's models table."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from detectron2.config import instantiate

from deformable_family import model_zoo
from deformable_family.model_zoo import catalog

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import model_stats  # noqa: E402

NAMES = model_zoo.list_configs()


def _count(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_every_config_has_metadata_and_recorded_statistics():
    entries = {e.name: e for e in catalog.zoo_entries()}
    assert sorted(entries) == NAMES
    problems = []
    for name in NAMES:
        folder, file = os.path.split(name)
        described = catalog.read_metadata(os.path.join(model_zoo.configs_root(), folder))
        if file not in described.get("configs", {}):
            problems.append(
                f"add `{file}: {{variant: ..., paper_ap: ...}}` to configs/{folder}/{catalog.METADATA_FILE}"
            )
        if entries[name].parameters is None:
            problems.append(f"run python tools/model_stats.py --config-file {name} --record")
    assert not problems, "Model-zoo table rows incomplete:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_recorded_parameter_counts_match_the_config(name):
    folder, file = os.path.split(model_zoo.get_config_file(name))
    record = catalog.read_stats(folder).get(file)
    if record is None:
        pytest.skip(
            "no record (test_every_config_has_metadata_and_recorded_statistics fails for it)"
        )
    with torch.device("meta"):  # no memory: R101 builds in a moment
        model = instantiate(model_zoo.get_config(name).model)
    rerun = f"the config changed: re-run python tools/model_stats.py --config-file {name} --record"
    assert record["parameters"] == _count(model), rerun
    assert record["trainable_parameters"] == _count(model, trainable_only=True), rerun


def test_table_columns_come_from_configs_metadata_and_records():
    entries = {e.name: e for e in catalog.zoo_entries(["deformable_detr/", "quickstart/"])}
    two_stage = entries["deformable_detr/deformable_detr_r50_two_stage_50ep.py"]
    assert (two_stage.family, two_stage.backbone, two_stage.paper_ap) == (
        "Deformable DETR",
        "R50",
        46.9,
    )
    # 184,824 iterations x 32 images over the 118,287 train2017 images (empty ones kept).
    assert two_stage.schedule == "50 ep, batch 32"
    assert entries["deformable_detr/deformable_detr_r101_50ep.py"].backbone == "R101"
    assert entries["deformable_detr/deformable_detr_r101_50ep.py"].paper_ap is None
    quickstart = entries["quickstart/deformable_detr_shapes.py"]
    assert (quickstart.family, quickstart.schedule) == ("Deformable DETR", "2,000 iter, batch 4")
    # Rows follow model_zoo.yaml's order.
    assert list(entries)[:2] == [
        "deformable_detr/deformable_detr_r50_single_scale_50ep.py",
        "deformable_detr/deformable_detr_r50_50ep.py",
    ]
    table = catalog.render_table(list(entries.values()))
    assert table.splitlines()[0].startswith(
        "| config | family | variant | backbone | schedule | params |"
    )
    lines = table.splitlines()
    assert len(lines) == 2 + len(entries) + 2
    assert lines[-1] == (
        'AP (paper): Deformable DETR: COCO val2017 box AP, Zhu et al., "Deformable DETR: Deformable '
        'Transformers for End-to-End Object Detection", ICLR 2021.'
    )


def test_readme_models_table_is_the_generated_table():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = catalog.render_table(catalog.zoo_entries())
    assert table in readme, (
        "README.md's models table is stale: replace it with the output of "
        "`python -m deformable_family.model_zoo`:\n" + table
    )


def test_module_prints_the_table_of_every_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deformable_family.model_zoo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [e.name for e in catalog.zoo_entries()]
    assert sorted(row.split("`")[1] for row in rows) == NAMES
    assert "Warning" not in result.stderr, result.stderr


def _folder_with(tmp_path, metadata: str):
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "a.py").write_text("")
    (folder / catalog.METADATA_FILE).write_text(metadata)
    return str(folder)


@pytest.mark.parametrize(
    "metadata, match",
    [
        ("family: [X]\n", "'family' must be a string"),
        ("family: X\nyear: 2021\n", "unknown keys \\['year'\\]"),
        ("family: X\nconfigs: {b.py: {variant: v}}\n", "configs\\['b.py'\\]: no such config"),
        (
            "family: X\nconfigs: {a.py: {variant: v, ap: 40}}\n",
            "configs\\['a.py'\\]: expected a mapping",
        ),
        ("family: X\nconfigs: {a.py: {variant: v, paper_ap: high}}\n", "paper_ap must be a number"),
    ],
)
def test_bad_metadata_is_named(tmp_path, metadata, match):
    folder = _folder_with(tmp_path, metadata)
    with pytest.raises(ValueError, match=match) as info:
        catalog.read_metadata(folder)
    assert catalog.METADATA_FILE in str(info.value)


def test_model_stats_records_the_config_as_shipped(tmp_path, capsys):
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs", "common"), configs / "common")
    shutil.copytree(os.path.join(ROOT, "configs", "quickstart"), configs / "quickstart")
    config = str(configs / "quickstart" / "deformable_detr_shapes.py")
    stats_file = configs / "quickstart" / catalog.STATS_FILE
    stats_file.write_text(
        json.dumps(
            {
                "other.py": {
                    "parameters": 1,
                    "trainable_parameters": 1,
                    "gflops": None,
                    "input_size": None,
                }
            }
        )
    )

    assert model_stats.main(["--config-file", config, "--no-flops", "--record"]) == 0
    with torch.device("meta"):
        model = instantiate(model_zoo.get_config("quickstart/deformable_detr_shapes.py").model)
    stats = json.loads(stats_file.read_text())
    assert stats["deformable_detr_shapes.py"] == {
        "parameters": _count(model),
        "trainable_parameters": _count(model, trainable_only=True),
        "gflops": None,
        "input_size": None,
    }
    assert "other.py" in stats  # other records are kept
    with pytest.raises(SystemExit, match="as shipped"):
        model_stats.main(
            ["--config-file", config, "--no-flops", "--record", "model.num_queries=10"]
        )
