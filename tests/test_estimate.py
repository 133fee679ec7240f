"""The cost estimator costs the step each stage trains: the StepSpec it maps a stage to carries every setting of the
stage's spec that the step depends on (as the benchmark builds its own steps), and the key that matches it to a
measured step tells an MLP projection from a linear one. Fast: plans, StepSpecs and meta-device FLOP counts only."""
from dataclasses import replace

import pytest

from harness.bench.flops import meta_flops_per_image
from harness.bench.spec import DISTILL_FIELDS, StepSpec, step_spec
from harness.plan.config import load_config
from harness.bench.estimate import _step_spec
from harness.plan.graph import build_plan
from harness.core.spec import ModelConfig

# settings off the defaults (and off the benchmark's profile), so a field left at its default shows
OVERRIDES = ["kd.kind=hard", "kd.weight=0.3", "kd.temperature=4.0", "pretrain.norm_pix_loss=true",
             "distill.distance=l2", "distill.alpha=0.5", "distill.pixel_weight=0.5", "distill.normalize=false",
             "distill.include_cls=false", "distill.teacher_mode=full", "finetune.layer_decay=0.65",
             "finetune.drop_path=0.2", "finetune.weight_decay=0.02", "pretrain.weight_decay=0.04"]


def plan_of(table, tmp_path, overrides=()):
    cfg = load_config(table, ["profile=tiny", f"results_root={tmp_path}", *overrides])
    return build_plan(cfg)


def student_pretrains(plan, objective):
    return [s.spec for s in plan.stages.values() if s.role == "student-pretrain" and s.spec.objective == objective]


def test_projection_is_carried_and_keyed(tmp_path):
    """recipes/projection.yaml: the mlp row's DMAE stage maps to a step with MLP heads, which neither equals nor
    matches (StepSpec.match_key) the linear row's, and counts more FLOPs per image (an earlier estimator built both
    with the default linear heads and costed the mlp row from the linear measurement)."""
    plan = plan_of("projection", tmp_path)
    by_proj = {}
    for spec in student_pretrains(plan, "dmae"):
        st = _step_spec(spec, "dmae", spec.pretrain.batch_size, 10)
        assert st.projection == spec.distill.projection
        by_proj.setdefault(st.projection, set()).add(st)
    assert set(by_proj) == {"linear", "mlp"}
    assert all(len(v) == 1 for v in by_proj.values()), by_proj  # seeds aside, one step per row
    (linear,), (mlp,) = by_proj["linear"], by_proj["mlp"]
    assert mlp != linear and mlp.match_key() != linear.match_key()
    assert replace(mlp, distill=linear.distill) == linear  # the projection is all that differs
    assert meta_flops_per_image(mlp) > meta_flops_per_image(linear)


def test_more_aligned_pairs_do_not_match_one_pair():
    """One projection head (and distance term) per aligned pair: a three-pair stage is not costed as a one-pair
    measurement that runs as many teacher blocks."""
    one = StepSpec("dmae", "vit_w64d4_dec64d1", 4, 28, 8, mask_ratio=0.75, teacher="vit_w128d6_dec64d1",
                   teacher_patch=4, teacher_mode="partial", pairs=((3, 5),))
    three = replace(one, pairs=((1, 2), (2, 4), (3, 5)))
    assert one.teacher_blocks_run() == three.teacher_blocks_run()
    assert one.match_key() != three.match_key()
    assert meta_flops_per_image(three) > meta_flops_per_image(one)


def test_stage_settings_reach_the_step(tmp_path):
    """table2 with non-default distillation, KD, pixel-loss and optimizer settings: the estimator's steps carry the
    plan's values (an earlier estimator dropped distill/kd/norm_pix_loss/layer decay and used the defaults)."""
    plan = plan_of("table2", tmp_path, OVERRIDES)
    (mae_spec, *_) = student_pretrains(plan, "mae")
    (dmae_spec, *_) = student_pretrains(plan, "dmae")
    for spec, kind in ((mae_spec, "mae"), (dmae_spec, "dmae")):
        st, p = _step_spec(spec, kind, 8, 10), spec.pretrain
        assert (st.norm_pix_loss, st.weight_decay, st.betas) == (True, p.weight_decay, tuple(p.betas))
        assert (st.mask_ratio, st.visible_rounding) == (p.mask_ratio, p.visible_rounding)
    st, d = _step_spec(dmae_spec, "dmae", 8, 10), dmae_spec.distill
    assert dict(st.distill) == {k: getattr(d, k) for k in DISTILL_FIELDS}
    assert dict(st.distill)["distance"] == "l2" and dict(st.distill)["alpha"] == 0.5
    assert (st.teacher_mode, st.pairs) == ("full", tuple(tuple(p) for p in d.pairs))
    assert (st.teacher, st.teacher_patch) == (dmae_spec.teacher_model.preset,
                                              dmae_spec.teacher_model.patch_size)

    kd_spec = next(s.spec for s in plan.stages.values() if s.role == "student-finetune" and s.spec.kd)
    st, f = _step_spec(kd_spec, "finetune_kd", 8, 10), kd_spec.finetune
    assert st.kd == ("hard", 0.3, 4.0)
    t = kd_spec.teacher_model
    assert (st.teacher, st.teacher_patch) == (t.preset, t.patch_size)
    assert (st.layer_decay, st.drop_path, st.weight_decay, st.betas) == (0.65, 0.2, 0.02, tuple(f.betas))
    assert (st.mixup, st.cutmix, st.smoothing) == (f.mixup, f.cutmix, f.smoothing)
    # the plain fine-tune of the same student: the same step but for the teacher and KD
    ft_spec = next(s.spec for s in plan.stages.values() if s.role == "student-finetune" and not s.spec.kd)
    ft = _step_spec(ft_spec, "finetune", 8, 10)
    assert replace(st, kind="finetune", teacher="", teacher_patch=0, kd=ft.kd) == ft


def test_estimator_and_benchmark_build_steps_alike(tmp_path):
    """The estimator's step for a stage equals the benchmark's profile step for the same settings (one builder,
    harness.bench.spec.step_spec): table2 at the tiny profile, batch aside."""
    from harness.bench.spec import profile_steps
    bench = dict(profile_steps("tiny"))
    plan = plan_of("table2", tmp_path)
    (mae_spec, *_) = student_pretrains(plan, "mae")
    dmae_spec = next(s for s in student_pretrains(plan, "dmae") if s.pretrain.mask_ratio == 0.75)
    kd_spec = next(s.spec for s in plan.stages.values() if s.role == "student-finetune" and s.spec.kd)
    ft_spec = next(s.spec for s in plan.stages.values() if s.role == "student-finetune" and not s.spec.kd)
    for label, spec, kind in (("mae_m75", mae_spec, "mae"), ("dmae_partial_m75", dmae_spec, "dmae"),
                              ("finetune", ft_spec, "finetune"), ("finetune_kd", kd_spec, "finetune_kd")):
        b = bench[label]
        assert _step_spec(spec, kind, b.batch, b.num_classes) == b, label


def test_step_spec_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="step kind"):
        step_spec("pretrain", ModelConfig("vit_w64d4_dec64d1", 4), 28, 8, 10)
