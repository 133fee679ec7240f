"""The typed stage spec (harness.core.spec): what the planner builds is what config.json holds and what the stage reads
back; unknown keys are refused; the dict form, and so every stage id, is the one finished results are filed under."""
import json

import pytest

from harness.plan.config import load_config
from harness.plan.resolve import runtime_of
from recipes import tables
from harness.plan.graph import build_plan
from harness.core.rundir import spec_hash
from harness.core.spec import (FinetuneStage, PretrainStage, SpecError, StageRuntime, spec_dict, stage_runtime,
                               stage_spec)

# Stages of the table2 run committed before the sensitive miniature, with the profile now called tiny-fast: a change
# to the spec's dict form would move these ids and orphan every finished result filed under them.
TABLE2_TINY_IDS = ("teacher-pretrain-mae-vit_w128d6_dec64d1p4-e16-3cf55525c9",
                   "teacher-finetune-vit_w128d6_dec64d1p4-e8-8d1f052094",
                   "student-pretrain-mae-vit_w64d4_dec64d1p4-m75-e8-s0-6837768140",
                   "student-finetune-kdsoft-e8-of-mae-vit_w64d4_dec64d1p4-m75-e8-s0-c07c6eb658",
                   "student-pretrain-dmae-vit_w64d4_dec64d1p4-from-vit_w128d6_dec64d1p4-m75-e8-s0-c313670164",
                   "evaluate-finetune-e8-of-dmae-vit_w64d4_dec64d1p4-from-vit_w128d6_dec64d1p4-m75-e8-s0-ca5e5dad32")


def test_stage_ids_of_finished_results_are_stable(tmp_path):
    plan = build_plan(load_config("table2", ["profile=tiny-fast", f"results_root={tmp_path}"]))
    assert set(TABLE2_TINY_IDS) <= set(plan.stages)
    for sid, stage in plan.stages.items():  # the id's hash: the dict form without the name
        assert sid == f"{stage.spec.name}-{spec_hash(spec_dict(stage.spec, name=False))[:10]}"


@pytest.mark.parametrize("table", tables())
def test_every_planned_spec_reads_back_from_its_json(table, tmp_path):
    """config.json round trip, as a stage re-reads it (python -m harness.core.stages <dir>): the same typed spec."""
    plan = build_plan(load_config(table, ["profile=smoke", f"results_root={tmp_path}"]))
    for stage in plan.stages.values():
        back = stage_spec(json.loads(json.dumps(spec_dict(stage.spec))))
        assert back == stage.spec and type(back) is type(stage.spec)
    runtime = runtime_of(load_config(table, ["profile=smoke", "run.nan_restarts=2"]))
    assert stage_runtime(json.loads(json.dumps(spec_dict(runtime)))) == runtime == StageRuntime(
        **{**spec_dict(runtime), "nan_restarts": 2})


def test_optional_sections_are_left_out_not_null(tmp_path):
    plan = build_plan(load_config("table2", ["profile=smoke", f"results_root={tmp_path}"]))
    by_role = {}
    for stage in plan.stages.values():
        d = spec_dict(stage.spec)
        if isinstance(stage.spec, PretrainStage):
            by_role.setdefault(stage.spec.objective, d)
        if isinstance(stage.spec, FinetuneStage):
            by_role.setdefault("kd" if stage.spec.kd else "ft", d)
    assert "distill" not in by_role["mae"] and "teacher_model" not in by_role["mae"]
    assert by_role["dmae"]["distill"]["pairs"] and by_role["dmae"]["teacher_model"]["preset"]
    assert by_role["ft"]["kd"] is None and "teacher_model" not in by_role["ft"]  # kd: null, as always
    assert by_role["kd"]["kd"]["kind"] == "soft" and "teacher_model" in by_role["kd"]


def test_a_spec_with_an_unknown_or_mistyped_key_is_refused(tmp_path):
    plan = build_plan(load_config("table2", ["profile=smoke", f"results_root={tmp_path}"]))
    d = spec_dict(next(s.spec for s in plan.stages.values() if s.kind == "pretrain"))
    with pytest.raises(SpecError, match="epochz"):
        stage_spec({**d, "pretrain": {**d["pretrain"], "epochz": 3}})
    with pytest.raises(SpecError, match="batch_size"):
        stage_spec({**d, "pretrain": {**d["pretrain"], "batch_size": "big"}})
    with pytest.raises(SpecError, match="kind"):
        stage_spec({**d, "kind": "distil"})
    with pytest.raises(SpecError, match="nan_restart"):
        stage_runtime({"nan_restart": 1})
