"""The benchmark end to end at the smoke shapes (seconds), and the cost estimates built from its JSON.

Timings are never asserted (machines are shared and noisy); FLOP counts are, because they are counts."""
import json
import math
from dataclasses import replace

import pytest

from harness.bench.cli import main
from harness.bench.flops import meta_flops_per_image
from harness.bench.results import SCHEMA
from harness.bench.spec import StepSpec, profile_cfg, profile_steps
from harness.bench.steps import Pool, build_step
from harness.plan.config import load_config
from harness.bench.estimate import estimate_details, estimate_plan
from harness.plan.graph import build_plan
from harness.core.spec import FinetuneSpec, spec_dict

STEP_FIELDS = ("id", "shape", "label", "spec", "batch", "flops_per_image", "step_s", "s_per_image", "images_per_s",
               "achieved_flops_per_s", "peak_fraction", "reps", "times_s")


@pytest.fixture(scope="module")
def smoke_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: the test machines are shared, and two OpenMP threads on a busy 2-core machine crawl
    assert main(["--shapes", "smoke", "--steps", "2", "--warmup", "1", "--data-images", "32", "--threads", "1",
                       "--out", str(out)]) == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    return out, json.loads(files[0].read_text())


def finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_json_fields_and_sane_values(smoke_bench):
    _, r = smoke_bench
    assert r["schema"] == SCHEMA and r["device"]["type"] == "cpu" and r["device"]["dtype"] == "fp32"
    sh = r["shapes"]["smoke"]
    assert finite_pos(sh["peak"]["flops_per_s"]["median"])
    labels = {e["label"] for e in sh["steps"]}
    assert {"mae_m75", "dmae_partial_m75", "dmae_full_m75", "dmae_partial_m95", "dmae_partial_m98", "finetune",
            "finetune_kd", "eval", "teacher_mae_m75", "teacher_finetune", "teacher_eval"} <= labels
    for e in sh["steps"]:
        for f in STEP_FIELDS:
            assert f in e, (e["label"], f)
        assert e["reps"] == 2 and len(e["times_s"]) == 2
        for f in ("flops_per_image", "s_per_image", "achieved_flops_per_s", "peak_fraction"):
            assert finite_pos(e[f]), (e["label"], f, e[f])
        assert e["step_s"]["min"] <= e["step_s"]["median"] <= e["step_s"]["max"]
        assert e["images_per_s"]["min"] <= e["images_per_s"]["median"] <= e["images_per_s"]["max"]
    by = {e["label"]: e for e in sh["steps"]}
    fl = {k: v["flops_per_image"] for k, v in by.items()}
    # FLOP counts (not timings): the teacher costs, the partial teacher costs less, fewer visible patches cost less
    assert fl["dmae_partial_m75"] > fl["mae_m75"]
    assert fl["dmae_partial_m75"] < fl["dmae_full_m75"]
    assert fl["dmae_partial_m98"] < fl["dmae_partial_m95"] < fl["dmae_partial_m75"]
    assert fl["finetune_kd"] > fl["finetune"] > fl["eval"]
    # attention is counted on CPU too (SDPA's CPU kernel has no built-in formula)
    assert any("attention" in op for op in by["mae_m75"]["flops_by_op_per_image"])
    rt = sh["ratios"]
    assert rt["dmae_over_mae"]["flops"] > 1
    assert rt["partial_over_full_teacher"]["flops"] < 1
    for v in rt.values():
        assert finite_pos(v["time"]) and finite_pos(v["flops"])
    assert r["data"], "Fashion-MNIST input pipeline was not measured"
    for d in r["data"]:
        assert finite_pos(d["images_per_s"]) and d["transform"] in ("pretrain", "finetune", "eval")


def test_meta_flop_count_equals_measured_count(smoke_bench):
    """The estimator's meta-device count (for shapes never benchmarked) agrees with the count of the real step."""
    _, r = smoke_bench
    for e in r["shapes"]["smoke"]["steps"]:
        spec = StepSpec.from_dict(e["spec"])
        assert meta_flops_per_image(spec) == pytest.approx(e["flops_per_image"], rel=1e-6), e["label"]


def smoke_plan(tmp_path, profile="smoke"):
    cfg = load_config("table2", [f"profile={profile}", f"results_root={tmp_path / 'results'}"])
    return build_plan(cfg), cfg


def test_estimate_plan_from_bench(smoke_bench, tmp_path):
    out, _ = smoke_bench
    plan, cfg = smoke_plan(tmp_path)
    est = estimate_plan(plan, cfg, bench_dir=out, verbose=False)
    assert set(est) == set(plan.stages)
    assert all(finite_pos(v) for v in est.values()), est
    details = estimate_details(plan, cfg, bench_dir=out)
    assert all(d["source"].startswith("measured smoke/") for d in details["stages"].values()), details["stages"]


def test_estimate_plan_flop_scales_unbenchmarked_shapes(smoke_bench, tmp_path):
    out, _ = smoke_bench
    plan, cfg = smoke_plan(tmp_path, "tiny")  # tiny's models were not benchmarked: FLOP-scaled from smoke's
    details = estimate_details(plan, cfg, bench_dir=out)
    assert set(details["stages"]) == set(plan.stages)
    assert all(finite_pos(d["seconds"]) and "FLOP-scaled" in d["source"] for d in details["stages"].values())


def test_estimate_costs_an_mlp_projection_by_its_flops(smoke_bench, tmp_path):
    """recipes/projection.yaml: the linear row's DMAE pre-trains take the benchmark's (linear-head) DMAE step as
    measured; the MLP row's are not that step, so they are FLOP-scaled from it, at their own (larger) FLOPs."""
    out, _ = smoke_bench
    cfg = load_config("projection", ["profile=smoke", f"results_root={tmp_path / 'results'}"])
    plan = build_plan(cfg)
    details = estimate_details(plan, cfg, bench_dir=out)["stages"]
    by_proj = {}
    for sid, stage in plan.stages.items():
        if stage.role == "student-pretrain" and stage.spec.objective == "dmae":
            by_proj.setdefault(stage.spec.distill.projection, []).append(details[sid])
    assert set(by_proj) == {"linear", "mlp"}
    assert all(d["source"].startswith("measured smoke/dmae_partial_m75") for d in by_proj["linear"]), by_proj
    assert all(d["source"].startswith("FLOP-scaled from smoke/dmae_partial_m75") for d in by_proj["mlp"]), by_proj
    assert min(d["seconds"] for d in by_proj["mlp"]) > max(d["seconds"] for d in by_proj["linear"])


def test_estimate_plan_prefers_a_finished_twin(smoke_bench, tmp_path):
    out, _ = smoke_bench
    plan, cfg = smoke_plan(tmp_path)
    sid, stage = next((s, st) for s, st in plan.stages.items() if st.role == "student-pretrain")
    twin = plan.root / "twin-stage"
    twin.mkdir(parents=True)
    (twin / "config.json").write_text(json.dumps({"spec": dict(spec_dict(stage.spec), seed=stage.spec.seed + 7)}))
    (twin / "result.json").write_text(json.dumps({"wall_s": 123.0, "world_size": 1, "stage_id": "twin-stage"}))
    assert estimate_plan(plan, cfg, bench_dir=out, verbose=False)[sid] == 123.0


def test_estimate_plan_without_benchmarks_is_empty(tmp_path):
    plan, cfg = smoke_plan(tmp_path)
    assert estimate_plan(plan, cfg, bench_dir=tmp_path / "no-bench", verbose=False) == {}
    (tmp_path / "empty").mkdir()
    assert estimate_plan(plan, cfg, bench_dir=tmp_path / "empty", verbose=False) == {}


def _groups(param_groups):
    return [(g["weight_decay"], g.get("lr_scale", 1.0), sorted(tuple(p.shape) for p in g["params"]))
            for g in param_groups]


def test_benchmarked_steps_train_with_the_stages_settings_and_builders():
    """The benchmark measures the step training runs: its steps carry the profile's optimizer, distillation and KD
    settings, and their optimizer and objective come from harness.core.build, as the stages' do (an earlier bench had
    its own factory: no weight decay on cls/mask tokens in pre-training, hard-coded KD settings)."""
    import torch

    from harness.core import build
    c = profile_cfg("tiny")
    steps = dict(profile_steps("tiny"))
    mae, dmae, ft, kd = steps["mae_m75"], steps["dmae_partial_m75"], steps["finetune"], steps["finetune_kd"]
    pre, fin = c["pretrain"], c["finetune"]
    assert (mae.weight_decay, mae.betas) == (pre["weight_decay"], tuple(pre["betas"]))
    assert (ft.weight_decay, ft.layer_decay, ft.betas) == (fin["weight_decay"], fin["layer_decay"], tuple(fin["betas"]))
    assert kd.kd == (c["kd"]["kind"], c["kd"]["weight"], c["kd"]["temperature"])
    assert mae.norm_pix_loss == dmae.norm_pix_loss == pre["norm_pix_loss"]
    assert {k: v for k, v in dmae.distill} == {k: c["distill"][k] for k, _ in dmae.distill}

    pool = Pool(torch.device("cpu"))
    for spec, param_groups in ((mae, build.pretrain_param_groups), (ft, None)):
        step = build_step(pool, spec, "none")
        model = step.models[0]
        opt = next(v for k, v in pool.items.items() if k[0] == "opt" and k[1] == id(model))
        ref = build.pretrain_param_groups(model, pre["weight_decay"]) if param_groups else \
            build.finetune_param_groups(model, fin["weight_decay"], fin["layer_decay"])
        assert _groups(opt.param_groups) == _groups(ref)
        assert opt.param_groups[0]["betas"] == (tuple(pre["betas"]) if param_groups else tuple(fin["betas"]))
    objective = next(v for k, v in pool.items.items() if k[0] == "objective" and k[1] == ft)
    assert type(objective) is type(build.finetune_objective(10, FinetuneSpec(mixup=fin["mixup"], cutmix=fin["cutmix"])))
    # the pixel loss as the stages build it (pretrain.norm_pix_loss), also when the profile turns it on
    pix = replace(mae, norm_pix_loss=not pre["norm_pix_loss"])
    build_step(pool, pix, "none")
    objective = next(v for k, v in pool.items.items() if k[0] == "objective" and k[1] == pix)
    assert objective.norm_pix == pix.norm_pix_loss
