"""The planner: plan.json round trip and refusals, a budget never overspent (measured on a tiny model),
a model without a plan refused with the command that makes one, and the shipped plan's own promise."""
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline

from minidiff import cli, planner
from minidiff.pipeline import load
from minidiff.planner import Config, Grid
from minidiff.samplers import num_model_calls

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = 6
TINY = Grid(fewer_steps=(2, 3, 4), cached_steps=(4,), intervals=(2, 3), forecasts=(0, 2), branches=(0,),
            deep_branches=(1,), adaptive_steps=(4,), adaptive_budgets=(0.4, 0.7), composed_adaptive_budgets=(0.8,))
SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "digits-cond" / "plan.json"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=4)


@pytest.fixture(scope="module")
def rows(pipe):
    configs = planner.grid_configs(TINY, REFERENCE, pipe.unet.num_branches)
    return planner.measure(pipe, configs, reference_steps=REFERENCE, seeds=(1, 2))


def entry_of(rows, sampler="ddim", guidance=None):
    return planner.make_entry(rows, sampler=sampler, guidance_scale=guidance, reference_steps=REFERENCE,
                              seeds=(1, 2), model="tiny", seconds=1.0)


def test_the_grid_holds_each_family_and_the_measured_costs_are_the_runs_own(pipe, rows):
    families = {r["family"] for r in rows}
    assert families == {"reference", "fewer steps", "caching", "composed"}
    for r in rows:
        config = Config.from_dict(r)
        pipe.generate(**config.kwargs("ddim"), noise=pipe.initial_noise(2, generator=torch.Generator().manual_seed(5)),
                      class_labels=[0, 1], progress=False)
        calls = num_model_calls("ddim", config.steps) / REFERENCE
        if config.kind == "adaptive":  # planned at its cap, which a run on other noise never exceeds
            assert r["cost"] == pytest.approx(calls * config.budget)
            assert calls * pipe.last_run.mac_fraction <= r["cost"] + 1e-9
        else:  # a fixed schedule costs the same on any noise
            assert r["cost"] == pytest.approx(calls * pipe.last_run.mac_fraction, abs=1e-12)
    reference = next(r for r in rows if r["family"] == "reference")
    assert reference["cost"] == 1.0 and reference["psnr"] == planner.PSNR_CAP
    assert all(r["psnr"] < planner.PSNR_CAP for r in rows if r is not reference)


def test_the_grid_holds_only_what_the_network_runs():
    full = planner.grid_configs(Grid(), 50, num_branches=9)
    assert full[0] == Config(50) and len(full) == len(set(full)) == 58
    dit = planner.grid_configs(Grid(), 50, num_branches=1, adaptive=False)  # the adaptive schedule left out, one branch
    assert {c.kind for c in dit} == {"none", "uniform"} and {c.branch for c in dit} == {0}
    assert max(c.steps for c in planner.grid_configs(Grid(), 20, 9)) == 20  # nothing above the reference


def test_plan_json_round_trip_keeps_other_plans_and_refuses_to_overwrite(tmp_path, rows):
    path = tmp_path / "plan.json"
    planner.write_entry(path, entry_of(rows))
    planner.write_entry(path, entry_of(rows, guidance=3.0))  # another guidance: added, not a clash
    data = planner.read_plan(path)
    assert [e["guidance_scale"] for e in data["plans"]] == [1.0, 3.0]
    assert data["plans"][0]["rows"] == json.loads(json.dumps(rows))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        planner.write_entry(path, entry_of(rows[:3]))
    assert path.read_bytes() == before
    planner.write_entry(path, entry_of(rows[:3]), overwrite=True)
    data = planner.read_plan(path)
    assert [len(e["rows"]) for e in data["plans"]] == [len(rows), 3]  # g=3 kept, g=1 replaced
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary left behind


def test_a_damaged_plan_is_one_clear_error(tmp_path, rows):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        planner.plan_for(tmp_path, 0.5, steps=REFERENCE)
    entry = entry_of(rows)
    entry["rows"][1]["kind"] = "sometimes"
    path.write_text(json.dumps({"format": planner.PLAN_FORMAT, "version": 1, "plans": [entry]}))
    with pytest.raises(ValueError, match="damaged plan"):
        planner.read_plan(path)


@pytest.mark.parametrize("budget", [round(0.05 * i, 2) for i in range(1, 21)])
def test_plan_for_never_picks_a_configuration_over_budget(rows, budget):
    plan = {"plans": [entry_of(rows)]}
    fits = [r for r in rows if r["cost"] <= budget]
    if not fits:
        with pytest.raises(ValueError, match="below the cheapest planned run"):
            planner.plan_for(plan, budget, steps=REFERENCE)
        return
    chosen = planner.plan_for(plan, budget, steps=REFERENCE)
    row = next(r for r in rows if Config.from_dict(r).kwargs("ddim") == chosen)
    assert row["cost"] <= budget
    assert row["psnr"] == max(r["psnr"] for r in fits)


@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_a_planned_run_spends_at_most_its_budget(pipe, rows, budget):
    pipe.plan = {"plans": [entry_of(rows)]}
    try:
        images = planner.generate_within(pipe, budget, steps=REFERENCE, class_labels=[0, 2], seed=9)
    finally:
        del pipe.plan
    chosen = pipe.last_run.plan
    assert chosen["budget"] == budget and images.shape == (2, 3, 8, 8)
    spent = num_model_calls("ddim", pipe.last_run.steps) / REFERENCE * pipe.last_run.mac_fraction
    assert spent <= budget + 1e-9
    with pytest.raises(ValueError, match="drop cache_interval"):
        planner.generate_within(pipe, budget, steps=REFERENCE, plan={"plans": [entry_of(rows)]}, cache_interval=2)


def test_a_model_without_a_plan_is_refused_with_the_command(tmp_path, pipe, rows):
    with pytest.raises(planner.NoPlan, match=r"`python -m minidiff plan --model MODEL_DIR --sampler ddim "
                                             r"--guidance-scale 1 --steps 50`"):
        planner.generate_within(pipe, 0.3, class_labels=[0])
    planner.write_entry(tmp_path / "plan.json", entry_of(rows))  # a plan for 6 steps at guidance 1 only
    with pytest.raises(planner.NoPlan, match=f"--model {tmp_path} --sampler unipc --guidance-scale 3 --steps 6"):
        planner.plan_for(tmp_path, 0.3, steps=REFERENCE, sampler="unipc", guidance=3.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        planner.plan_for(tmp_path / "elsewhere", 0.3)


def test_cli_plan_writes_then_refuses_without_overwrite(tmp_path, capsys):
    model = tmp_path / "tiny"
    tiny_pipeline(seed=4).save(model)
    argv = ["--model", str(model), "--steps", "4", "--seeds", "1", "--quick", "--threads", "1"]
    assert cli.run("plan", argv) == 0
    written = (model / "plan.json").read_bytes()
    assert planner.plan_for(model, 1.0, steps=4) == {"steps": 4, "sampler": "ddim"}
    capsys.readouterr()
    assert cli.run("plan", argv) == 1
    assert "already holds a plan for ddim at guidance 1 with 4 steps; pass --overwrite" in capsys.readouterr().err
    assert (model / "plan.json").read_bytes() == written
    assert cli.run("plan", argv + ["--guidance-scale", "2"]) == 0  # another guidance is added beside it
    assert len(planner.read_plan(model / "plan.json")["plans"]) == 2
    assert cli.run("plan", argv + ["--overwrite"]) == 0
    loaded = load(model)  # a loaded pipeline finds the plan in its own folder
    planner.generate_within(loaded, 1.0, steps=4, class_labels=[0], seed=1)
    assert loaded.last_run.plan == {"budget": 1.0, "reference_steps": 4, "steps": 4, "sampler": "ddim"}
    with pytest.raises(planner.NoPlan, match=f"`python -m minidiff plan --model {model} --sampler ddim "):
        planner.generate_within(loaded, 0.5, class_labels=[0])  # 50 steps: not planned


@pytest.mark.skipif(not SHIPPED.exists(), reason="weights/digits-cond has no plan.json")
def test_the_shipped_plan_reads_and_keeps_its_budgets():
    data = planner.read_plan(SHIPPED)
    ddim = next(e for e in data["plans"] if (e["sampler"], e["guidance_scale"], e["steps"]) == ("ddim", 1.0, 50))
    for item in ddim["budgets"]:
        if item["config"] is not None:
            row = ddim["rows"][item["config"]]
            assert row["cost"] <= item["budget"] + 1e-9
            assert planner.plan_for(SHIPPED, item["budget"]) == Config.from_dict(row).kwargs("ddim")


def test_generate_with_a_budget_runs_the_plans_choice_and_refuses_cache_options():
    """generate(budget=) is generate_within: the shipped plan picks steps and caching, at most the budget."""
    pipe = load(Path(__file__).resolve().parents[1] / "weights" / "digits-cond")
    args = dict(steps=50, class_labels=[3, 7], seed=21, output="latent", progress=False)
    images = pipe.generate(budget=0.2, **args)
    chosen = pipe.last_run.plan
    assert chosen["budget"] == 0.2 and pipe.last_run.mac_fraction * chosen["steps"] / 50 <= 0.2 + 1e-9
    by_hand = pipe.generate(**{**args, **{k: v for k, v in chosen.items() if k not in ("budget", "reference_steps")}})
    assert torch.equal(images, by_hand)
    with pytest.raises(ValueError, match="drop cache_interval"):
        pipe.generate(budget=0.2, cache_interval=3, **args)


def test_cli_sample_with_a_budget_says_what_the_plan_chose(tmp_path, capsys):
    model = Path(__file__).resolve().parents[1] / "weights" / "digits-cond"
    argv = ["sample", "--model", str(model), "--budget", "0.3", "--class", "4", "--batch-size", "2",
            "--out", str(tmp_path / "b.png"), "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "the plan for budget 0.3: " in out and (tmp_path / "b.png").exists()
    assert cli.main(argv[:-2] + ["--cache-interval", "3", "--threads", "1"]) == 1
    assert "drop --cache-interval" in capsys.readouterr().err
