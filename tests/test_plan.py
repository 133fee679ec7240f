"""Recipes, config validation and stage planning (no training)."""
import pytest

from harness.plan.config import ConfigError, load_config
from recipes import tables
from harness.plan.graph import build_plan, describe
from harness.core.rundir import RunTree


def plan_for(*overrides, tmp_path=None):
    extra = [f"results_root={tmp_path}"] if tmp_path else []
    return build_plan(load_config("table2", ["profile=smoke", *extra, *overrides]))


def test_table2_is_a_recipe_and_defaults_to_tiny():
    assert "table2" in tables()
    cfg = load_config("table2")
    assert cfg.profile == "tiny" and cfg.launcher.name == "local"
    assert set(cfg.rows) == {"mae", "kd_finetuned_teacher", "dmae_75", "dmae_95", "dmae_98", "scratch"}


def test_shared_stages_run_once(tmp_path):
    plan = plan_for(tmp_path=tmp_path)
    by_role = {}
    for s in plan.stages.values():
        by_role.setdefault(s.role, []).append(s)
    assert len(by_role["teacher-pretrain"]) == 1 and len(by_role["teacher-finetune"]) == 1
    # MAE baseline pre-train feeds both the MAE row and the KD row: 4 student pre-trains for 5 rows
    assert len(by_role["student-pretrain"]) == 4
    assert len(by_role["student-finetune"]) == 6 and len(by_role["evaluate"]) == 6
    cells = {c.row: c for c in plan.cells}
    assert cells["mae"].pretrain == cells["kd_finetuned_teacher"].pretrain
    assert cells["mae"].finetune != cells["kd_finetuned_teacher"].finetune
    kd_ft = plan.stages[cells["kd_finetuned_teacher"].finetune]
    assert kd_ft.inputs["kd_teacher"] == cells["kd_finetuned_teacher"].teacher["finetuned"]
    dmae_pt = plan.stages[cells["dmae_95"].pretrain]
    assert dmae_pt.inputs["teacher"] == cells["dmae_95"].teacher["pretrained"]
    assert dmae_pt.spec.pretrain.mask_ratio == 0.95


def test_scratch_builds_no_pretrain_stage(tmp_path):
    plan = plan_for(tmp_path=tmp_path)
    cell = next(c for c in plan.cells if c.row == "scratch")
    assert cell.pretrain is None and cell.method == "scratch"
    ft = plan.stages[cell.finetune]
    assert ft.inputs == {} and ft.kind == "finetune" and ft.spec.kd is None
    # the same fine-tune recipe and student as the MAE row: only the start differs
    mae_ft = plan.stages[next(c for c in plan.cells if c.row == "mae").finetune]
    assert ft.spec.finetune == mae_ft.spec.finetune and ft.spec.model == mae_ft.spec.model
    assert ft.spec.seed == mae_ft.spec.seed
    # nothing upstream of the scratch row: no pre-train, no teacher
    assert not plan.deps(ft) and not cell.teacher


def test_probes_score_every_encoder_a_row_starts_from(tmp_path):
    plan = plan_for(tmp_path=tmp_path)
    cells = {c.row: c for c in plan.cells}
    for row in ("mae", "dmae_75", "scratch"):
        probe = plan.stages[cells[row].probe]
        assert probe.kind == "probe" and probe.role == "student-probe" and probe.spec.split == "test"
        assert probe.spec.block == -1
        assert probe.inputs == ({"encoder": cells[row].pretrain} if cells[row].pretrain else {})
    assert cells["mae"].probe == cells["kd_finetuned_teacher"].probe  # the same encoder, probed once
    teacher_probe = plan.stages[cells["dmae_75"].teacher["probe"]]
    pairs = plan.stages[cells["dmae_75"].pretrain].spec.distill.pairs
    assert teacher_probe.role == "teacher-probe" and teacher_probe.spec.block == max(t for _, t in pairs)
    assert teacher_probe.inputs == {"encoder": cells["dmae_75"].teacher["pretrained"]}
    assert not [s for s in plan_for("probe.enabled=false", tmp_path=tmp_path).stages.values() if s.kind == "probe"]


def test_finetune_subset_is_what_fine_tuning_reads(tmp_path):
    plan = plan_for("data.train_subset=400", "data.finetune_subset=100", tmp_path=tmp_path)
    for s in plan.stages.values():
        assert not hasattr(s.spec.data, "finetune_subset")
        assert s.spec.data.train_subset == (100 if s.kind == "finetune" else 400), s.id
    with pytest.raises(ConfigError, match="finetune_subset=500 exceeds data.train_subset=400"):
        plan_for("data.train_subset=400", "data.finetune_subset=500")


def test_a_scratch_row_refuses_what_it_would_ignore():
    with pytest.raises(ConfigError, match="rows.scratch.pretrain: a scratch row has no pre-training"):
        load_config("table2", ["profile=smoke", "+rows.scratch.pretrain.mask_ratio=0.9"])


def test_graph_order_puts_inputs_first(tmp_path):
    plan = plan_for(tmp_path=tmp_path)
    seen = set()
    for sid, stage in plan.stages.items():
        assert all(dep in seen for dep in plan.deps(stage)), sid
        seen.add(sid)


def test_seeds_repeat_student_rows_only(tmp_path):
    one, three = plan_for(tmp_path=tmp_path), plan_for("seeds=3", tmp_path=tmp_path)
    roles = lambda p, r: [s for s in p.stages.values() if s.role == r]  # noqa: E731
    assert len(roles(three, "teacher-pretrain")) == 1
    assert len(roles(three, "student-pretrain")) == 3 * len(roles(one, "student-pretrain"))
    assert len(three.cells) == 18 and {c.seed for c in three.cells} == {0, 1, 2}


def test_stage_ids_are_stable_and_change_only_downstream(tmp_path):
    a, b = plan_for(tmp_path=tmp_path), plan_for(tmp_path=tmp_path)
    assert list(a.stages) == list(b.stages)
    c = plan_for("rows.dmae_95.pretrain.mask_ratio=0.9", tmp_path=tmp_path)
    changed = set(c.stages) ^ set(a.stages)
    assert changed and all("dmae" in sid and ("m95" in sid or "m90" in sid) for sid in changed)
    # a teacher change invalidates everything that depends on the teacher, not the MAE baseline
    d = plan_for("teacher.pretrain.epochs=2", tmp_path=tmp_path)
    cells_a, cells_d = {x.row: x for x in a.cells}, {x.row: x for x in d.cells}
    assert cells_a["mae"].evaluate == cells_d["mae"].evaluate
    assert cells_a["dmae_75"].evaluate != cells_d["dmae_75"].evaluate


def test_dry_run_lists_every_stage(tmp_path):
    plan = plan_for(tmp_path=tmp_path)
    text = describe(plan)
    assert all(sid in text for sid in plan.stages)
    assert "[   todo]" in text


def test_stages_finished_by_another_table_are_reused_and_not_costed(tmp_path):
    """A stage id is the same computation in every table of a results root: masking finds the stages table2 has
    finished (the teacher, the MAE baseline, DMAE at 75/95/98%), the dry run lists them as reused at no cost, and a
    run links them in (hard links) instead of running them; one being run right now is left alone."""
    import fcntl
    import os

    from harness.core.locks import LOCK_FILE
    from harness.core.rundir import write_json
    table2 = plan_for(tmp_path=tmp_path)
    for sid in table2.stages:
        table2.dir(sid).mkdir(parents=True)
        (table2.dir(sid) / "model.pth").write_bytes(b"weights of " + sid.encode())
        write_json({"stage_id": sid, "status": "done", "wall_s": 1.0}, table2.dir(sid) / "result.json")
    masking = build_plan(load_config("masking", ["profile=smoke", f"results_root={tmp_path}"]))
    shared = [sid for sid in masking.stages if sid in table2.stages]
    assert shared and len(shared) < len(masking.stages)
    est = {sid: 60.0 for sid in masking.stages}
    text = describe(masking, est)
    assert text.count("[ reused]") == len(shared) and "finished in table2" in text
    assert f"Estimated remaining compute: ~{len(masking.stages) - len(shared):.1f} min ({len(shared)} stage(s)" in text
    # a stage the same command plans first for another table is shared (`all --dry-run`)
    fresh = build_plan(load_config("masking", ["profile=smoke", f"results_root={tmp_path / 'other'}"]))
    assert describe(fresh, est, {shared[0]: "table2"}).count("[ shared]") == 1
    busy = masking.dir(shared[0])
    busy.mkdir(parents=True)
    with open(busy / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        linked = RunTree.of(masking).reuse_finished(log=lambda msg: None)
    assert sorted(linked) == sorted(shared[1:])
    for sid in linked:
        assert RunTree.of(masking).status(sid) == "done"
        assert os.path.samefile(masking.dir(sid) / "model.pth", table2.dir(sid) / "model.pth")
    assert RunTree.of(masking).status(shared[0]) == "todo"


@pytest.mark.parametrize("override, message", [
    ("pretrain.mask_ration=0.5", "mask_ration"),
    ("rows.dmae_95.pretrain.mask_ratio=1.0", "mask_ratio"),
    ("distill.pairs=[[1,7]]", "teacher block 7"),
    ("distill.align=[1.5]", "fraction"),
    ("distill.pairs=[[5,1]]", "student block 5"),
    ("student.preset=vit_gigantic", "vit_gigantic"),
    ("pretrain.epochs=ten", "epochs"),
    ("launcher=nope", "launcher"),
    ("distill.distance=cosine", "distance"),
    ("finetune.batch_size=63", "even"),
    ("data.img_size=30", "patch_size"),
    ("seeds=0", "seeds"),
])
def test_bad_config_is_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("table2", ["profile=smoke", override])


def test_row_override_typo_is_rejected():
    with pytest.raises(ConfigError, match="mask_ration"):
        load_config("table2", ["profile=smoke", "+rows.dmae_95.pretrain.mask_ration=0.9"])


def test_paper_profile_requires_data_and_checkpoints():
    with pytest.raises(ConfigError, match="data.root"):
        load_config("table2", ["profile=paper"])
    with pytest.raises(ConfigError, match="finetuned_ckpt"):
        load_config("table2", ["profile=paper", "data.root=/x", "teacher.pretrained_ckpt=/a"])
    cfg = load_config("table2", ["profile=paper", "data.root=/x", "teacher.pretrained_ckpt=/a",
                                 "teacher.finetuned_ckpt=/b"])
    assert cfg.student.preset == "vit_base" and cfg.teacher.model.preset == "vit_large"
    assert list(cfg.distill.align) == [0.75]  # -> the official pair (8, 17) for ViT-B <- ViT-L
    assert cfg.pretrain.effective_batch == 4096 and cfg.finetune.effective_batch == 1024
    plan = build_plan(cfg)
    # 128 per GPU x 4 accum x 8 GPUs = 4096 (launcher=local: the 8 GPUs of this machine)
    pre = next(s.spec.pretrain for s in plan.stages.values() if s.role == "student-pretrain")
    assert (pre.batch_size, pre.accum_iter) == (128, 4)
    # no teacher is trained; the provided pre-trained one is probed at its aligned block, the provided fine-tuned one
    # evaluated on the test split (its measured top-1 beside the official number)
    assert sorted((s.role, str(s.inputs), getattr(s.spec, "block", None)) for s in plan.stages.values()
                  if s.role.startswith("teacher")) == [("teacher-evaluate", str({"model": "file:/b"}), None),
                                                       ("teacher-probe", str({"encoder": "file:/a"}), 17)]
    assert {str(s.spec.distill.pairs) for s in plan.stages.values() if getattr(s.spec, "objective", "") == "dmae"} == \
        {"[[8, 17]]"}
    assert {s.inputs.get("teacher") for s in plan.stages.values() if s.role == "student-pretrain"} >= {"file:/a"}


def test_unknown_table():
    with pytest.raises(ConfigError, match="unknown table"):
        load_config("table99")


def test_world_size_is_what_each_launcher_starts():
    """One stage's process count, as the planner (effective batch -> accum_iter) and the estimator see it: debug
    runs in the driver's process, local starts one task per GPU of this machine (nodes do not apply), slurm runs
    nodes x tasks per node (one per GPU, or launcher.tasks_per_node); a CPU job is one task unless it asks for
    more."""
    from omegaconf import OmegaConf

    from harness.plan.resolve import world_size
    got = {name: (world_size(OmegaConf.create(dict(name=name, nodes=3, gpus_per_node=2))),
                  world_size(OmegaConf.create(dict(name=name, nodes=1, gpus_per_node=0))))
           for name in ("debug", "local", "slurm")}
    assert got == {"debug": (1, 1), "local": (2, 1), "slurm": (6, 1)}
    # CPU tasks (gloo DDP, e.g. a rehearsal of a multi-GPU run): launcher.tasks_per_node
    cpu = {name: world_size(OmegaConf.create(dict(name=name, nodes=3, gpus_per_node=0, tasks_per_node=2)))
           for name in ("debug", "local", "slurm")}
    assert cpu == {"debug": 1, "local": 2, "slurm": 6}


# ------------------------------------------------------------------------------------ paper scale: batches, memory
PAPER = ["profile=paper", "launcher=slurm", "data.root=/datasets/imagenet", "teacher.pretrained_ckpt=/ckpt/p.pth",
         "teacher.finetuned_ckpt=/ckpt/f.pth"]
OFFICIAL = {"pretrain": (4096, 2.4e-3), "finetune": (1024, 2e-3)}  # effective batch, lr = blr x batch / 256


@pytest.mark.parametrize("launcher, world, accum", [
    (["launcher.gpus_per_node=8"], 8, {"pretrain": 4, "finetune": 1}),  # the official 8-GPU job
    (["launcher.gpus_per_node=4"], 4, {"pretrain": 8, "finetune": 2}),
    # 16 GPUs hold 1024 only at 64 per GPU (the error says so: test_paper_effective_batch_refused_...)
    (["launcher.gpus_per_node=8", "launcher.nodes=2", "finetune.batch_size=64"], 16, {"pretrain": 2, "finetune": 1}),
])
def test_paper_profile_keeps_the_official_effective_batches_on_any_gpu_count(launcher, world, accum, tmp_path):
    cfg = load_config("table2", [*PAPER, *launcher, f"results_root={tmp_path}"])
    plan = build_plan(cfg)
    seen = set()
    for s in plan.stages.values():
        if s.kind not in OFFICIAL:
            continue
        sec = getattr(s.spec, s.kind)
        effective, lr = OFFICIAL[s.kind]
        assert sec.accum_iter == accum[s.kind], s.id
        assert sec.batch_size * sec.accum_iter * world == effective, s.id
        assert sec.blr * sec.batch_size * sec.accum_iter * world / 256 == pytest.approx(lr, rel=1e-12)
        seen.add(s.kind)
    assert seen == {"pretrain", "finetune"}
    # the derived accum_iter is part of the spec: another world size that changes it gives other stage ids
    other = build_plan(load_config("table2", [*PAPER, "launcher.gpus_per_node=2", f"results_root={tmp_path}"]))
    trained = {sid for sid, s in plan.stages.items() if s.kind in OFFICIAL}
    assert trained and not trained & set(other.stages)


def test_paper_effective_batch_refused_where_no_accumulation_fits(tmp_path):
    with pytest.raises(ConfigError) as e:  # 4096 / (128 x 3): not a whole number of steps
        load_config("table2", [*PAPER, "launcher.gpus_per_node=3"])
    msg = str(e.value)
    assert msg.startswith("pretrain.effective_batch=4096 is not a positive multiple of batch_size 128 x 3 device(s)")
    assert "launcher.gpus_per_node=3" in msg and "pretrain.batch_size" in msg and "no batch_size can" in msg
    with pytest.raises(ConfigError, match=r"finetune.effective_batch=1024 .* 2048 per step .* launcher.nodes=2 x "
                                          r"launcher.gpus_per_node=8.* \(finetune.batch_size=64 gives accum_iter 1\)"):
        load_config("table2", [*PAPER, "launcher.nodes=2"])
    # an accum_iter given beside the profile's effective_batch would be replaced by the derived one: refused
    with pytest.raises(ConfigError, match=r"pretrain.accum_iter=8: would be ignored, because "
                                          r"pretrain.effective_batch=4096 is set .* pretrain.effective_batch=null"):
        load_config("table2", [*PAPER, "pretrain.accum_iter=8"])
    with pytest.raises(ConfigError, match=r"\+rows.mae.finetune.accum_iter=2: would be ignored, because "
                                          r"finetune.effective_batch=1024"):
        load_config("table2", [*PAPER, "+rows.mae.finetune.accum_iter=2"])
    cfg = load_config("table2", [*PAPER, "pretrain.effective_batch=null", "pretrain.accum_iter=8"])  # explicit
    pre = next(s.spec.pretrain for s in build_plan(cfg).stages.values() if s.role == "student-pretrain")
    assert pre.accum_iter == 8


def test_slurm_memory_is_40_gb_per_gpu_per_node_and_30_requeues(tmp_path):
    from harness.plan.resolve import mem_gb_of
    from harness.run.sbatch import _directives
    cfg = load_config("table2", PAPER)
    assert cfg.launcher.max_requeues == 30 and cfg.launcher.mem_gb is None and cfg.launcher.mem_gb_per_gpu == 40
    assert mem_gb_of(cfg.launcher) == 320  # per node: 8 GPUs x 40 GB (sbatch --mem and submitit's mem_gb: per node)
    assert "#SBATCH --mem=327680M" in _directives(cfg, "x", tmp_path)
    assert mem_gb_of(load_config("table2", [*PAPER, "launcher.gpus_per_node=4"]).launcher) == 160
    assert mem_gb_of(load_config("table2", [*PAPER, "launcher.mem_gb=500"]).launcher) == 500  # explicit wins
    cpu = load_config("table2", ["profile=tiny", "launcher=slurm"]).launcher  # no GPU: Slurm's default memory
    assert mem_gb_of(cpu) is None and not any("--mem" in d for d in _directives(
        load_config("table2", ["profile=tiny", "launcher=slurm"]), "x", tmp_path))
    assert load_config("table2", ["profile=tiny"]).launcher.max_requeues == 3  # local: unchanged
    with pytest.raises(ConfigError, match=r"launcher.mem_gb_per_gpu=0.0 must be > 0"):
        load_config("table2", [*PAPER, "launcher.mem_gb_per_gpu=0"])


def test_cuda_under_the_local_launcher_needs_gpus_per_node():
    """submitit's local executor sets CUDA_VISIBLE_DEVICES to the GPUs a job asks for: with gpus_per_node=0 a
    run.device=cuda stage would find no GPU inside its job."""
    with pytest.raises(ConfigError, match=r"run.device=cuda with launcher=local and launcher.gpus_per_node=0: .*"
                                          r"Set launcher.gpus_per_node=1"):
        load_config("table2", ["profile=smoke", "run.device=cuda"])
    assert load_config("table2", ["profile=smoke", "run.device=cuda", "launcher.gpus_per_node=1"])
    assert load_config("table2", ["profile=smoke", "run.device=cuda", "launcher=debug"])  # in this process


def test_a_provided_fine_tuned_teacher_is_evaluated_and_checked_as_a_classifier(tmp_path):
    """Every KD claim rests on the fine-tuned teacher: a provided one gets a teacher-evaluate stage (its test top-1
    beside the official number), checked before submission as the classifier it is; a trained teacher's plan (the
    tiny profile's) is unchanged."""
    import torch

    from harness.core.models import PRESETS, build_classifier, build_mae
    from harness.run.preflight import PreflightError, check_inputs
    mae = tmp_path / "mae.pth"
    torch.save({"model": build_mae(PRESETS["vit_w48d3_dec48d1"], 28, 4).state_dict()}, mae)
    clf = tmp_path / "clf.pth"
    torch.save({"model": build_classifier(PRESETS["vit_w48d3_dec48d1"], 10, 28, 4).state_dict()}, clf)
    # the teacher recipe: a DMAE row reads the fine-tuned teacher as an encoder (any MAE layout passes), and the
    # teacher evaluation as a classifier (a file without a head does not); no KD row here
    args = ["profile=smoke", f"results_root={tmp_path / 'r'}", "teacher.train=false", f"teacher.pretrained_ckpt={mae}",
            "~rows.kd_finetuned_teacher"]
    cfg = load_config("teacher", [*args, f"teacher.finetuned_ckpt={clf}"])
    plan = build_plan(cfg)
    ev = [s for s in plan.stages.values() if s.role == "teacher-evaluate"]
    assert len(ev) == 1 and ev[0].id.startswith("teacher-evaluate-provided-vit_w48d3_dec48d1p4-")
    assert ev[0].inputs == {"model": f"file:{clf}"} and ev[0].cells == [("dmae_finetuned_teacher", 0)]
    assert ev[0].spec.model.preset == "vit_w48d3_dec48d1"
    check_inputs(plan, cfg)
    bad = load_config("teacher", [*args, f"teacher.finetuned_ckpt={mae}"])
    with pytest.raises(PreflightError, match=rf"teacher.finetuned_ckpt={mae}: model checkpoint for "
                                             r"teacher-evaluate-provided-"):
        check_inputs(build_plan(bad), bad)
    # a trained teacher keeps its own evaluation only
    trained = build_plan(load_config("teacher", ["profile=smoke", f"results_root={tmp_path / 't'}"]))
    assert [s.id.split("-")[2] for s in trained.stages.values() if s.role == "teacher-evaluate"] == \
        ["vit_w48d3_dec48d1p4"]
