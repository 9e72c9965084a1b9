"""Tests of the benchmark's own parts, at toy size: model making, I/O floor, tables, GPU check."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pearl_edu.reading import read_header
from pearl_edu.teaching import minipearl
from pearl_edu.teaching.evaluation import ItemScores, Record
from pearl_edu.teaching.toy import hf_config, load_state_dict, tensor_shapes
from pearl_edu.verification import verify

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_merge  # noqa: E402
import full_merge  # noqa: E402
import io_floor  # noqa: E402
import mini_pearl_seeds  # noqa: E402
import seeds_beyond_slerp  # noqa: E402
from make_models import make_model_pair  # noqa: E402

TOY = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=96)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    # 20 kB shards: the toy model is spread over several files, with an index.
    return make_model_pair(
        tmp_path_factory.mktemp("bench") / "pair", num_layers=2, shard_bytes=20_000, **TOY
    )


def test_model_pair_has_real_names_shapes_and_sharding(pair):
    model_a, model_b = pair
    config = hf_config(arch="mistral", num_layers=2, tie_embeddings=False, **TOY)
    expected = tensor_shapes(config)
    for model_dir in pair:
        header = read_header(model_dir)
        assert {n: m.shape for n, m in header.tensors.items()} == expected
        assert {m.dtype for m in header.tensors.values()} == {torch.bfloat16}
        assert len(header.files) > 1
        assert (model_dir / "model.safetensors.index.json").is_file()
    assert read_header(model_a).config["num_hidden_layers"] == 2


def test_model_b_is_a_sibling_of_model_a(pair):
    a, b = (load_state_dict(m) for m in pair)
    q = "model.layers.1.self_attn.q_proj.weight"
    cosine = torch.nn.functional.cosine_similarity(
        a[q].double().flatten(), b[q].double().flatten(), 0
    )
    # b = a + 0.5 * std * noise: cos = 1 / sqrt(1.25) = 0.894, up to sampling error.
    assert abs(float(cosine) - 0.894) < 0.02
    norm = "model.norm.weight"
    assert float(a[norm].float().mean()) == pytest.approx(1.0, abs=0.05)


def test_model_pair_is_deterministic(tmp_path, pair):
    again = make_model_pair(tmp_path / "again", num_layers=2, shard_bytes=20_000, **TOY)
    assert verify(pair[0], again[0]).identical
    assert verify(pair[1], again[1]).identical
    other_seed = make_model_pair(tmp_path / "other", num_layers=2, seed=1, **TOY)
    assert not verify(pair[0], other_seed[0]).ok


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("buffered", [False, True])
def test_io_floor_reads_both_and_writes_a_copy_of_a(tmp_path, pair, buffered, pipelined):
    out = tmp_path / "floor"
    written = io_floor.copy_through(pair[0], pair[1], out, buffered=buffered, pipelined=pipelined)
    assert written == read_header(pair[0]).total_bytes
    assert verify(pair[0], out).identical


def test_io_floor_raises_a_read_error_from_its_reading_thread(tmp_path, pair, monkeypatch):
    def broken(meta, buffer, direct):
        raise OSError(f"{meta.name}: unreadable")

    monkeypatch.setattr(io_floor, "read_tensor", broken)
    with pytest.raises(OSError, match="unreadable"):
        io_floor.copy_through(pair[0], pair[1], tmp_path / "floor", pipelined=True)


def test_full_merge_compares_with_the_faster_floor_by_median_and_in_each_round():
    seconds = {  # per variant, rounds 0, 1, 2
        "pearl-edu": (12.0, 11.0, 13.0),
        "pearl-edu-torch": (14.0, 14.0, 14.0),
        "floor": (11.0, 9.0, 12.0),
        "floor-pipelined": (10.0, 10.0, 10.0),
    }
    records = [
        {
            "variant": variant,
            "run": run,
            "seconds": wall,
            "cpu_seconds": wall / 2,
            "peak_rss_mb": 1000.0,
            **({} if variant in full_merge.FLOORS else {"output_sha256": {"a.safetensors": "x"}}),
        }
        for variant, walls in seconds.items()
        for run, wall in enumerate(walls)
    ]
    summary, identical = full_merge.summarize(records)
    # Medians: floor 11, pipelined 10: the pipelined floor is the one compared with.
    assert summary["pearl-edu"]["over_floor_median"] == pytest.approx(1.2)
    assert summary["floor"]["over_floor_median"] == pytest.approx(1.1)
    # In each round, the faster of that round's two floors: 10, 9, 10.
    assert summary["pearl-edu"]["over_floor_same_round"] == [1.2, round(11 / 9, 3), 1.3]
    assert identical["identical"] and identical["outputs_compared"] == 6
    assert [len(set(full_merge.run_order(run))) for run in range(4)] == [4] * 4
    assert len({tuple(full_merge.run_order(run)) for run in range(4)}) == 4


def test_summary_ratios_and_targets():
    records = [
        {
            "layers": n,
            "tool": tool,
            "run": run,
            "seconds": seconds * n,
            "cpu_seconds": 2 * seconds * n,
            "peak_rss_mb": rss,
        }
        for n in (2, 4)
        for run in range(3)
        for tool, seconds, rss in (
            ("pearl-edu", 2.0 + run, 800 + n),
            ("mergekit", 10.0, 3000),
            ("floor", 1.5, 100),
            ("floor-buffered", 1.0, 100),
        )
    ]
    rows = [
        bench_merge.summarize(n, [r for r in records if r["layers"] == n], 10**9, 5 * 10**8)
        for n in (2, 4)
    ]
    assert rows[0]["pearl_edu_s"] == 6.0  # median of 4, 6, 8
    assert rows[0]["pearl_over_mergekit"] == pytest.approx(0.3)
    assert rows[0]["pearl_over_floor"] == pytest.approx(2.0)
    met = bench_merge.check_targets(rows)
    assert met["pearl_over_mergekit"] is True and met["pearl_over_floor"] is False
    assert met["pearl_peak_rss"] is True
    assert met["pearl_rss_growth_measured"] == pytest.approx(804 / 802 - 1)
    rows[0].update(identical_to_mergekit=True, elements_differing_from_mergekit=0)
    rows[1].update(
        identical_to_mergekit=False,
        elements_differing_from_mergekit=3,
        elements_compared=1_000_000,
    )
    table = bench_merge.markdown_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| 2 | 1.0 GB | 6.0 s | 20.0 s")
    assert "| 12 s / 40 s |" in table[2]
    assert table[2].endswith("| identical |")
    assert table[3].endswith("| 3 of 1,000,000 elements differ |")
    assert bench_merge.agreement_text({}) == "not checked"


def test_every_tool_follows_every_other_tool_once_in_four_runs():
    orders = [bench_merge.run_order(run) for run in range(4)]
    assert all(sorted(order) == sorted(bench_merge.TOOLS) for order in orders)
    follows = [(order[i], order[i + 1]) for order in orders for i in range(len(order) - 1)]
    n = len(bench_merge.TOOLS)
    assert len(set(follows)) == len(follows) == n * (n - 1)
    assert bench_merge.run_order(4) == orders[0]


def test_benchmark_config_is_pearls_recipe_on_the_stand_ins(tmp_path):
    from pearl_edu.config import load_config

    text = bench_merge.slerp_config(2, tmp_path / "a", tmp_path / "b")
    pearl = load_config("pearl-7b-slerp")
    config = load_config(text)
    assert config.merge_method == pearl.merge_method == "slerp"
    assert config.dtype == pearl.dtype
    assert config.parameters == pearl.parameters
    assert [s.layer_range for s in config.slices[0].sources] == [(0, 2), (0, 2)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_check_fails_fast_without_cuda(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "needs" in result.stderr and "MAKE_ONLY=1" in result.stderr
    assert not (tmp_path / "work").exists(), "nothing is written before the CUDA check"


def test_gpu_check_model_step_runs_on_the_cpu(tmp_path):
    toy_args = "--hidden-size 64 --intermediate-size 128 --vocab-size 96"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MAKE_ONLY": "1", "LAYERS": "2", "KEEP": "1", "MODEL_ARGS": toy_args},
    )
    assert result.returncode == 0, result.stderr
    assert "stopping after the models" in result.stdout
    header = read_header(tmp_path / "work" / "model_b")
    assert header.config["num_hidden_layers"] == 2
    assert header.tensors["model.embed_tokens.weight"].shape == (96, 64)
    # Pearl's parents: the base (OmniBeagle's stand-in) float16, the other bfloat16.
    dtypes = [
        {meta.dtype for meta in read_header(tmp_path / "work" / name).tensors.values()}
        for name in ("model_a", "model_b")
    ]
    assert dtypes == [{torch.float16}, {torch.bfloat16}]
    assert read_header(tmp_path / "work" / "model_a").config["torch_dtype"] == "float16"


def test_gpu_check_dry_run_needs_no_gpu_and_writes_nothing(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DRY_RUN": "1", "METHODS": "ties"},
    )
    assert result.returncode == 0, result.stderr
    assert "would write two 32-layer models (14.5 GB each, float16 and bfloat16)" in result.stdout
    assert "would merge ties on cuda" in result.stdout and "--fast-trim" in result.stdout
    assert "would merge slerp" not in result.stdout
    assert not (tmp_path / "work").exists()


def test_gpu_check_whole_script_with_a_cpu_standing_in_for_the_gpu(tmp_path):
    toy_args = "--hidden-size 64 --intermediate-size 128 --vocab-size 96"
    results = tmp_path / "runs.json"
    results.write_text('[{"date": "2026-01-01", "device": "earlier", "methods": {}}]\n')
    log = tmp_path / "log.md"
    before = (ROOT / "bench" / "gpu_results.md").read_text()
    env = {
        **os.environ,
        "GPU_DEVICE": "cpu",
        "LAYERS": "2",
        "MODEL_ARGS": toy_args,
        "RESULTS_JSON": str(results),
        "RESULTS_MD": str(log),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: the contract held for every method" in result.stdout
    assert "| slerp |" in result.stdout and "| ties (CPU: --fast-trim) |" in result.stdout
    assert not (tmp_path / "work").exists(), "the work folder is deleted unless KEEP=1"
    runs = json.loads(results.read_text())
    assert [run["device"] for run in runs] == ["earlier", "cpu standing in for a GPU"]
    run = runs[-1]
    assert set(run["methods"]) == {"slerp", "ties"}
    for figures in run["methods"].values():
        assert {"cpu_s", "cuda_s", "contract_ok", "peak_host_gb", "peak_device_gb"} <= set(figures)
        assert figures["contract_ok"] is True and figures["max_input_scale_ulp"] <= 1
        assert figures["peak_host_gb"] > 0 and figures["elements"] > 0
    assert run["methods"]["slerp"]["max_cosine_diff"] <= 2e-4
    assert run["date"] == datetime.date.today().isoformat()
    assert run["parents"] == ["float16", "bfloat16"] and run["layers"] == 2
    assert log.read_text().startswith("# `bench/gpu_check.sh`")
    assert "## Check of " in log.read_text()
    assert (ROOT / "bench" / "gpu_results.md").read_text() == before, "a stand-in records nothing"


def test_gpu_check_judges_a_run_by_the_targets():
    import gpu_check

    def figures(cpu_s, cuda_s, ok=True, host=1.0, cpu_host=1.5):
        return {
            "cpu_s": cpu_s,
            "cuda_s": cuda_s,
            "contract_ok": ok,
            "peak_host_gb": host,
            "cpu_peak_host_gb": cpu_host,
        }

    met = gpu_check.judge({"slerp": figures(10.0, 9.0), "ties": figures(60.0, 20.0)})
    assert met == {
        "slerp_no_slower_on_gpu": True,
        "ties_3x_faster_on_gpu": True,
        "contract_held": True,
        "host_memory_no_higher": True,
    }
    met = gpu_check.judge({"slerp": figures(10.0, 11.0), "ties": figures(59.0, 20.0, ok=False)})
    assert met["slerp_no_slower_on_gpu"] is False and met["ties_3x_faster_on_gpu"] is False
    assert met["contract_held"] is False
    only = gpu_check.judge({"slerp": figures(1.0, 1.0, host=2.0)})
    assert only["ties_3x_faster_on_gpu"] is None and only["host_memory_no_higher"] is False


def test_gpu_check_records_append_and_read_back(tmp_path):
    import gpu_check

    run = {
        "date": "2026-12-01",
        "device": "NVIDIA H200, 140 GiB",
        "host": "16 CPU cores",
        "layers": 32,
        "command": "bench/gpu_check.sh",
        "methods": {
            "slerp": {
                "cpu_s": 12.6,
                "cuda_s": 6.3,
                "contract_ok": True,
                "peak_host_gb": 1.5,
                "peak_device_gb": 2.1,
                "cpu_peak_host_gb": 1.62,
                "smi_peak_gb": 3.0,
                "max_input_scale_ulp": 1.0,
                "max_cosine_diff": 7.2e-5,
            }
        },
        "targets": {"slerp_no_slower_on_gpu": True, "contract_held": True},
    }
    path, log = tmp_path / "runs.json", tmp_path / "log.md"
    gpu_check.record(run, path, log)
    gpu_check.record({**run, "date": "2026-12-02"}, path, log)
    assert [r["date"] for r in json.loads(path.read_text())] == ["2026-12-01", "2026-12-02"]
    text = log.read_text()
    assert text.count("## Check of ") == 2
    assert "| slerp | 12.6 s | 6.3 s | 1.50 / 1.62 GB | 2.10 / 3.00 GB | held | 1 ULP |" in text
    assert "SLERP's largest cosine difference: 7.2e-05." in text
    # The book parses the earlier runs' sections by their "## Run" headings: none added.
    assert "## Run" not in text


def test_gpu_check_configs_are_pearls_recipe_and_a_ties_merge(tmp_path):
    import gpu_check

    from pearl_edu.config import load_config

    texts = gpu_check.configs(tmp_path / "a", tmp_path / "b", 32)
    slerp, ties = load_config(texts["slerp"]), load_config(texts["ties"])
    pearl = load_config("pearl-7b-slerp")
    assert slerp.parameters == pearl.parameters and slerp.dtype == "bfloat16"
    assert ties.merge_method == "ties" and ties.dtype == "bfloat16"
    assert str(tmp_path / "a") in texts["ties"] and "density: 0.5" in texts["ties"]


def test_gpu_check_puts_the_outputs_where_there_is_room(tmp_path, monkeypatch):
    import gpu_check

    free = {tmp_path / "work": 100.0, Path("/dev/shm"): 100.0, tmp_path / "other": 100.0}
    monkeypatch.setattr(gpu_check, "free_gb", lambda path: free[path])
    for path in free:
        path.mkdir(exist_ok=True)
    work, other = tmp_path / "work", tmp_path / "other"
    assert gpu_check.plan_outputs(work, None, 14_500_000_000) == work / "gpu-check-outputs"
    assert gpu_check.plan_outputs(work, other, 14_500_000_000) == other / "gpu-check-outputs"
    free[work] = 20.0
    shm = Path("/dev/shm") / "gpu-check-outputs"
    assert gpu_check.plan_outputs(work, None, 14_500_000_000) == shm
    free[Path("/dev/shm")] = 20.0
    with pytest.raises(SystemExit, match="OUTPUTS_DIR"):
        gpu_check.plan_outputs(work, None, 14_500_000_000)
    with pytest.raises(SystemExit, match="LAYERS lower"):
        gpu_check.check_room_for_inputs(work, 32, "")
    gpu_check.check_room_for_inputs(work, 32, "--hidden-size 64")  # other shapes: checked later


def test_gpu_check_refuses_unknown_methods():
    import gpu_check

    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["work", "--methods", "slerp,dare"])
    assert exit_info.value.code == 2
    args = gpu_check.parse_args(["work", "--gpu", "cpu"])
    assert args.results_json is None, "a stand-in records nothing unless asked"
    assert gpu_check.parse_args(["work"]).results_json == gpu_check.RESULTS_JSON


def _stand_in(settings) -> minipearl.MiniPearl:
    """A mini-Pearl whose folders are only names: enough to write the benches' recipes."""
    folder = Path("/models")
    return minipearl.MiniPearl(
        folder / "base", folder / "generalist", folder / "math", {}, settings=settings
    )


@pytest.mark.parametrize("regime", ["siblings", "far"])
def test_chapter_07_record_holds_every_model_for_three_seeds(regime):
    """The record chapter 07 prints: every model the bench makes, both splits, three seeds."""
    name, settings = mini_pearl_seeds.REGIMES[regime]
    record = Record.load(name)
    assert record.seeds == [0, 1, 2]
    expected = ["base", "generalist", "math"]
    if regime == "siblings":
        expected += [f"slerp t={t}" for t in mini_pearl_seeds.SWEEP]
        expected += ["lerp t=0.5", *mini_pearl_seeds.SCHEDULES]
    else:
        expected += ["slerp t=0.5"]
    expected += ["half generalist step", "half math step"]
    assert record.names == expected
    assert record.meta["settings"] == repr(settings)
    for seed in record.seeds:
        assert list(record.scores[seed]) == expected
        for split in ("validation", "test"):
            items = record.get(seed, "base", split)
            assert len(items.addition_right) == 300 and len(items.text_total) == 300
    # Three trainings, not one copied: the bases differ item by item.
    assert record.get(0, "base") != record.get(1, "base") != record.get(2, "base")
    # The parents gained their own skills on every seed.
    for seed in record.seeds:
        base, generalist, math = (record.get(seed, n) for n in ("base", "generalist", "math"))
        assert generalist.text > base.text + 0.05 and math.addition > base.addition + 0.05


def test_chapter_07_schedules_replace_only_the_lists_of_t():
    from pearl_edu.config import load_config

    mini = _stand_in(minipearl.SIBLING_SETTINGS)
    attention, mlp = mini_pearl_seeds.SCHEDULES["ends moved in"]
    config = load_config(mini_pearl_seeds.schedule_recipe(mini, attention, mlp))
    pearl = load_config(minipearl.scaled_pearl_recipe(mini.generalist, mini.math, 4))
    assert config.merge_method == pearl.merge_method == "slerp"
    assert config.base_model == pearl.base_model and config.dtype == pearl.dtype
    t = yaml.safe_load(mini_pearl_seeds.schedule_recipe(mini, attention, mlp))["parameters"]["t"]
    assert t == [
        {"filter": "self_attn", "value": [0.25, 0.5, 0.3, 0.7, 0.75]},
        {"filter": "mlp", "value": [0.75, 0.5, 0.7, 0.3, 0.25]},
        {"value": 0.5},
    ]
    pearl_t = yaml.safe_load(
        mini_pearl_seeds.schedule_recipe(mini, *mini_pearl_seeds.SCHEDULES["Pearl's schedule"])
    )["parameters"]["t"]
    assert (
        pearl_t
        == yaml.safe_load(minipearl.scaled_pearl_recipe(mini.generalist, mini.math, 4))[
            "parameters"
        ]["t"]
    )


def test_chapter_07_table_has_a_row_per_model_and_a_column_per_seed():
    right = ItemScores((3, 1), (4, 4), (True, False, True, True))
    wrong = ItemScores((1, 1), (4, 4), (False, False, False, True))
    record = Record(
        {seed: {"base": {"test": wrong}, "merge": {"test": right}} for seed in (0, 4)}, {}
    )
    lines = mini_pearl_seeds.table(record).splitlines()
    assert len(lines) == 3 and "seed 4" in lines[0]
    assert lines[2] == f"{'merge':20s}" + "  50.0%/ 75.0%" * 2


@pytest.mark.parametrize("regime", ["siblings", "far"])
def test_chapter_10_record_holds_every_recipe_for_three_seeds(regime):
    """The record chapter 10 prints: one model per recipe the bench writes, three seeds."""
    name, settings = seeds_beyond_slerp.REGIMES[regime]
    record = Record.load(name)
    stand_in = _stand_in(settings)
    recipes = (
        seeds_beyond_slerp.recipes(stand_in)
        if regime == "siblings"
        else seeds_beyond_slerp.far_recipes(stand_in)
    )
    assert record.seeds == [0, 1, 2]
    assert record.names == ["base", "generalist", "math", *recipes]
    assert record.meta["settings"] == repr(settings)
    if regime == "siblings":
        for seed in record.seeds:
            # Density 1 drops nothing: DARE's plain sum is task arithmetic, item by item.
            for split in ("validation", "test"):
                assert record.get(seed, "dare_linear 1.0", split) == record.get(
                    seed, "task arithmetic 1.0", split
                )
            # Subtracting the specialist's step unlearns additions on every seed.
            minus = record.get(seed, "minus the math step")
            assert minus.addition < record.get(seed, "base").addition


def test_chapter_10_recipes_are_the_methods_they_are_named_after():
    from pearl_edu.config import load_config

    recipes = seeds_beyond_slerp.recipes(_stand_in(minipearl.SIBLING_SETTINGS))
    assert len(recipes) == 2 + 6 + 6 + 2 * 5 + 3
    ties = load_config(recipes["ties 0.2"])
    assert ties.merge_method == "ties" and ties.base_model == "/models/base"
    densities = [m["parameters"]["density"] for m in yaml.safe_load(recipes["ties 0.2"])["models"]]
    assert densities == [0.2, 0.2]
    task = yaml.safe_load(recipes["task arithmetic 0.75"])
    assert task["parameters"] == {"lambda": 0.75} and task["merge_method"] == "task_arithmetic"
    linear = yaml.safe_load(recipes["linear"])
    assert "base_model" not in linear
    assert [m["parameters"]["weight"] for m in linear["models"]] == [0.5, 0.5]
    minus = yaml.safe_load(recipes["minus the generalist step"])
    assert minus["models"] == [{"model": "/models/generalist", "parameters": {"weight": -1.0}}]


def test_numpy_era_drift_record_is_complete_and_adds_up():
    """The measurement behind verify's NUMPY_ERA_TOLERANCE: its keys, and numbers that agree."""
    import json

    import numpy_era_drift

    from pearl_edu.verification import NUMPY_ERA_TOLERANCE

    assert numpy_era_drift.DATA_FILE.stat().st_size < 16_000, "a few KB for a notebook"
    record = json.loads(numpy_era_drift.DATA_FILE.read_text())
    assert {"what", "recorded", "cpu", "versions", "runs", "seconds"} <= set(record)
    versions = record["versions"]
    for key in ("old_mergekit", "old_numpy", "old_torch", "mergekit", "numpy", "torch"):
        assert versions[key], key
    assert versions["old_mergekit"].startswith("0.0.") and versions["mergekit"] == "0.1.5"
    assert versions["old_numpy"].startswith("1."), "early 2024 had NumPy 1.x"
    assert record["old_slerp_uses_numpy"] is True
    assert [run["name"] for run in record["runs"]] == list(numpy_era_drift.RUNS)

    pairs = [f"{a}_vs_{b}" for a, b in numpy_era_drift.PAIRS]
    for run in record["runs"]:
        comparisons = run["comparisons"]
        assert set(comparisons) == {*pairs, "mistake_t0.6_vs_mergekit_0.1.5"}
        config = hf_config(
            arch="mistral",
            num_layers=run["layers"],
            hidden_size=run["hidden_size"],
            intermediate_size=run["intermediate_size"],
            num_heads=32 if run["hidden_size"] == 4096 else 4,
            num_kv_heads=8 if run["hidden_size"] == 4096 else 2,
            vocab_size=run["vocab_size"],
            tie_embeddings=False,
        )
        shapes = tensor_shapes(config)
        elements = sum(math.prod(shape) for shape in shapes.values())
        assert sum(run["tensors_by_branch"].values()) == len(shapes) == 2 + 9 * run["layers"] + 1
        for name, stats in comparisons.items():
            assert stats["tensors"] == len(shapes) and stats["elements"] == elements, name
            assert stats["fraction"] == pytest.approx(stats["differing"] / stats["elements"])
            assert sum(stats["ulp_histogram"].values()) == stats["differing"], name
            assert stats["tensors_differing"] <= stats["tensors"]
            assert stats["max_tensor_fraction"] >= stats["fraction"]
            if stats["differing"]:
                last = list(stats["ulp_histogram"])[-1].split("-")
                assert int(last[0]) <= stats["max_ulp"] <= int(last[-1]), name
            else:
                assert stats["max_ulp"] == 0 and stats["max_abs_diff"] == 0
        # pearl_edu reproduces mergekit 0.1.5 bit for bit, so the old one differs from both alike.
        same = comparisons["mergekit_0.1.5_vs_pearl_edu"]
        assert same["differing"] == 0 and same["ulp_histogram"] == {}
        old = comparisons["old_vs_mergekit_0.1.5"]
        assert old == comparisons["old_vs_pearl_edu"]
        # Rounding: within one bfloat16 step at the inputs' scale, which the tolerance accepts.
        assert old["max_input_scale_steps"] <= 1.0
        assert old["max_tensor_scale_steps"] <= NUMPY_ERA_TOLERANCE["scale_ulp"]
        assert old["max_tensor_fraction"] <= NUMPY_ERA_TOLERANCE["max_fraction"]
        # A real mistake changes most of a tensor: the tolerance refuses it.
        mistake = comparisons["mistake_t0.6_vs_mergekit_0.1.5"]
        assert mistake["max_tensor_fraction"] > NUMPY_ERA_TOLERANCE["max_fraction"]


def test_task_vector_benchmark_models_configs_and_counting(tmp_path):
    """Three siblings over one base; both configs merge them; kept fractions are counted."""
    import bench_task_vectors
    from make_models import make_models

    from pearl_edu.engine import merge

    models = make_models(tmp_path / "family", num_layers=2, count=3, **TOY)
    assert [m.name for m in models] == ["model_a", "model_b", "model_c"]
    base, first, second = (load_state_dict(m) for m in models)
    for name, tensor in base.items():
        a, b = (x[name].float() - tensor.float() for x in (first, second))
        assert a.abs().max() > 0 and not torch.equal(a, b)  # each fine-tune its own noise
        assert a.norm() < 0.6 * tensor.float().norm()  # and small next to the weights
    for method in ("ties", "dare_ties"):
        config = tmp_path / f"{method}.yml"
        config.write_text(bench_task_vectors.config_text(method, models))
        merge(config, tmp_path / method, progress=False)
        kept = bench_task_vectors.kept_fraction(tmp_path / method, models[0])
        # density 0.5 for each of two fine-tunes: an entry survives in one or the other.
        assert 0.5 < kept < 0.9
    assert bench_task_vectors.kept_fraction(models[0], models[0]) == 0.0
    labels = [label for label, _ in bench_task_vectors.tools_for("ties")]
    assert labels == ["ties", "ties --fast-trim", "mergekit ties"]


def test_task_vector_table_says_how_each_output_compares():
    import bench_task_vectors

    row = dict(
        case="ties --fast-trim",
        pearl_edu_s=20.0,
        mergekit_s=80.0,
        pearl_over_mergekit=0.25,
        pearl_edu_cpu_s=30.0,
        mergekit_cpu_s=90.0,
        pearl_edu_rss_mb=1600.0,
        mergekit_rss_mb=7000.0,
        versus_mergekit={"identical": False, "differing": 5, "compared": 1000},
    )
    table = bench_task_vectors.markdown_table([row])
    assert "| `ties --fast-trim` | 20.0 s | 80.0 s | 0.25x |" in table
    assert "5 of 1,000 differ (0.500%)" in table
    dare = dict(row, case="dare_ties", kept_fraction=0.75, mergekit_kept_fraction=0.751)
    del dare["versus_mergekit"]
    assert "entries changed 75.0% (mergekit 75.1%)" in bench_task_vectors.markdown_table([dare])


# --------------------------------------------------------------------------------------
# Peak memory beside max RSS: the /proc sampler, and the memory record.


def test_proc_fields_are_read_in_kilobytes():
    import proc_memory

    text = "Name:\tpython\nVmRSS:\t  2128 kB\nRssAnon:\t 148 kB\nRssFile:\t1980 kB\nThreads:\t1\n"
    assert proc_memory.kb_fields(text, ("VmRSS", "RssAnon", "RssShmem")) == {
        "VmRSS": 2128,
        "RssAnon": 148,
    }
    assert proc_memory.kb_fields(text, ()) == {}


def run_child(code: str, rollup: bool = True):
    import proc_memory

    command = [sys.executable, "-c", code]
    done, peaks = proc_memory.run_sampled(command, rollup=rollup, rollup_interval=0.05)
    assert done.returncode == 0, done.stderr
    return done, peaks


# The child's own high-water mark of its resident set, what GNU time reports as max RSS.
PRINT_HWM = (
    "print(next(int(line.split()[1]) for line in open('/proc/self/status') "
    "if line.startswith('VmHWM')))"
)


def test_sampler_counts_anonymous_memory_of_the_whole_process_tree():
    grandchild = "import time; b = bytearray(150 * 10**6); time.sleep(0.6)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    _, peaks = run_child(code)
    # The grandchild's 150 MB, though the child itself holds next to nothing.
    assert peaks["peak_rss_anon_mb"] > 140 and peaks["peak_pss_anon_mb"] > 140
    assert peaks["peak_vmrss_mb"] >= peaks["peak_rss_anon_mb"]
    assert peaks["memory_samples"] >= 10  # 20 ms apart over more than 0.6 s
    assert 2 <= peaks["pss_samples"] < peaks["memory_samples"]  # PSS less often


def test_sampler_tells_mapped_file_pages_from_anonymous_memory(tmp_path):
    """A process that maps a file and touches it: max RSS counts the file, RssAnon does not."""
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(128 * 2**20))
    code = (
        "import mmap, time\n"
        f"f = open({str(data)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
        "total = sum(m[i] for i in range(0, len(m), 4096))\n"
        "time.sleep(0.4)\n" + PRINT_HWM
    )
    done, peaks = run_child(code)
    max_rss_mb = int(done.stdout.split()[-1]) * 1024 / 1e6
    assert max_rss_mb > 130  # the mapped file's 134 MB, counted as the process's own
    assert peaks["peak_rss_file_mb"] > 130
    assert peaks["peak_rss_anon_mb"] < 60 and peaks["peak_pss_anon_mb"] < 60
    # PSS still counts a file mapped by this process alone, whole.
    assert peaks["peak_pss_mb"] > 130


def test_sampler_without_rollup_reads_status_only():
    _, peaks = run_child("import time; time.sleep(0.1)", rollup=False)
    assert {"peak_vmrss_mb", "peak_rss_anon_mb", "peak_rss_file_mb"} <= set(peaks)
    assert "peak_pss_mb" not in peaks


def test_process_tree_finds_children_and_grandchildren():
    import time

    import proc_memory

    grandchild = "import time; time.sleep(3)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while len(proc_memory.process_tree(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = proc_memory.process_tree(child.pid)
        assert tree[0] == child.pid and len(tree) == 2
    finally:
        child.wait(timeout=30)
    assert proc_memory.process_tree(2**22 + 7) == [2**22 + 7]  # gone: itself only, no error
    assert proc_memory.tree_memory(2**22 + 7)["VmRSS"] == 0


def memory_record(case, tool, rss, anon, run=0):
    return {
        "case": case,
        "tool": tool,
        "run": run,
        "peak_rss_mb": rss,
        "peak_rss_anon_mb": anon,
        "peak_pss_mb": rss - 10,
        "peak_pss_anon_mb": anon,
        "peak_rss_file_mb": rss - anon,
    }


def test_memory_record_keeps_each_section_and_labels_its_machine(tmp_path):
    records = [
        memory_record("slerp, 2 layers", "pearl-edu", 1200.0, 550.0),
        memory_record("slerp, 2 layers", "mergekit", 4700.0, 1400.0),
        memory_record("slerp, 2 layers", "mergekit", 4900.0, 1600.0, run=1),
    ]
    section = bench_merge.memory_section("about", records, "abc", "busy")
    assert section["page_cache"].startswith("warm") and section["sample_interval_s"] == 0.02
    assert {"cpu_count", "ram_gb"} <= set(section["machine"]) and section["note"] == "busy"
    rows = {(r["case"], r["tool"]): r for r in section["summary"]}
    assert rows[("slerp, 2 layers", "mergekit")]["peak_rss_anon_mb"] == 1500.0  # the median
    assert rows[("slerp, 2 layers", "mergekit")]["runs"] == 2
    path = tmp_path / "memory.json"
    ties = bench_merge.memory_section("about", [memory_record("ties", "mergekit", 1, 1)], "", "")
    path.write_text(json.dumps({"task_vectors": ties}))
    bench_merge.save_memory_section("slerp", section, path)
    saved = json.loads(path.read_text())
    assert saved == {"task_vectors": ties, "slerp": section}
    table = path.with_suffix(".md").read_text()
    assert "## task_vectors" in table and "## slerp" in table
    other = {**section, "summary": section["summary"][:1]}
    bench_merge.save_memory_section("slerp", other, path)
    assert json.loads(path.read_text())["slerp"]["summary"] == other["summary"]


def test_memory_table_puts_anonymous_memory_beside_max_rss():
    records = [memory_record("ties", "mergekit", 7365.0, 2100.0)]
    section = bench_merge.memory_section("about", records, "abc", "")
    table = bench_merge.memory_markdown({"task_vectors": section})
    assert "| ties | mergekit | 7,365 MB | 2,100 MB | 7,355 MB | 2,100 MB | 5,265 MB |" in table
    cores = section["machine"]["cpu_count"]
    assert f"{cores} CPU cores" in table and "warm" in table


def test_recorded_memory_is_consistent_with_itself():
    """bench/memory_results.json: each tool's anonymous peak within its max RSS, both tools."""
    record = json.loads((ROOT / "bench" / "memory_results.json").read_text())
    assert set(record) == {"slerp", "task_vectors"}
    for section in record.values():
        assert section["page_cache"].startswith("warm") and section["machine"]["cpu_count"] >= 1
        assert {r["tool"] for r in section["summary"]} == {"pearl-edu", "mergekit"}
        for row in section["summary"]:
            assert 0 < row["peak_rss_anon_mb"] <= row["peak_rss_mb"] * 1.02, row
            assert row["peak_pss_anon_mb"] <= row["peak_pss_mb"] <= row["peak_rss_mb"] * 1.02
        for run in section["runs"]:
            assert run["memory_samples"] > 0
    cases = [r["case"] for r in record["task_vectors"]["summary"]]
    assert set(cases) == {"ties", "ties --fast-trim", "dare_ties"}


# --------------------------------------------------------------------------------------
# The package's GPU record, which --device auto reads, follows bench/gpu_results.json.


def gpu_figures(cpu_s, cuda_s, ok=True, host=1.0, cpu_host=1.5):
    return {
        "cpu_s": cpu_s,
        "cuda_s": cuda_s,
        "contract_ok": ok,
        "peak_host_gb": host,
        "cpu_peak_host_gb": cpu_host,
    }


def test_gpu_check_judges_each_method_by_its_own_targets():
    import gpu_check

    assert gpu_check.method_met_targets("slerp", gpu_figures(12.6, 12.0)) is True
    assert gpu_check.method_met_targets("slerp", gpu_figures(12.6, 15.4)) is False
    assert gpu_check.method_met_targets("slerp", gpu_figures(12.6, 6.0, host=2.2)) is False
    assert gpu_check.method_met_targets("ties", gpu_figures(60.0, 20.0)) is True
    assert gpu_check.method_met_targets("ties", gpu_figures(59.0, 20.0)) is False
    assert gpu_check.method_met_targets("ties", gpu_figures(60.0, 10.0, ok=False)) is False
    assert gpu_check.method_met_targets("dare_ties", gpu_figures(60.0, 1.0)) is False


def test_gpu_record_lists_only_real_runs_and_methods_that_met_their_targets(tmp_path, monkeypatch):
    import gpu_check

    from pearl_edu.devices import choose_device, gpu_record

    runs = [
        {
            "date": "2027-01-05",
            "device": "NVIDIA H100 80GB HBM3, 79 GiB",
            "layers": 32,
            "methods": {"slerp": gpu_figures(12.6, 15.4), "ties": gpu_figures(60.0, 12.0)},
        },
        {
            "date": "2027-01-06",
            "device": "cpu standing in for a GPU",
            "methods": {"slerp": gpu_figures(12.6, 1.0)},
        },
        {"date": "2027-01-07", "device": "NVIDIA H100", "methods": {"slerp": gpu_figures(1, 2)}},
    ]
    results = tmp_path / "gpu_results.json"
    results.write_text(json.dumps(runs))
    path = tmp_path / "gpu_record.json"
    made = gpu_check.sync_package_record(results, path)
    assert [run["date"] for run in made["runs"]] == ["2027-01-05"]
    assert made["runs"][0]["methods"] == {
        "ties": {"targets_met": True, "cpu_s": 60.0, "cuda_s": 12.0}
    }
    record = gpu_record(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_device("auto", "ties", record=record).device.type == "cuda"
    assert choose_device("auto", "slerp", record=record).device.type == "cpu"
    assert gpu_check.sync_package_record(tmp_path / "none.json", path)["runs"] == []


def test_shipped_gpu_record_is_what_gpu_check_makes_of_the_recorded_runs():
    import gpu_check

    from pearl_edu.devices import gpu_record

    results = ROOT / "bench" / "gpu_results.json"
    runs = json.loads(results.read_text()) if results.is_file() else []
    assert gpu_record() == gpu_check.package_record(runs)


def test_gpu_check_updates_the_package_record_only_with_the_repositorys_results(tmp_path):
    import gpu_check

    real = gpu_check.parse_args([str(tmp_path)])
    assert real.package_record == gpu_check.PACKAGE_RECORD
    elsewhere = gpu_check.parse_args([str(tmp_path), "--results-json", str(tmp_path / "r.json")])
    assert elsewhere.package_record is None
    standing_in = gpu_check.parse_args([str(tmp_path), "--gpu", "cpu"])
    assert standing_in.results_json is None and standing_in.package_record is None
