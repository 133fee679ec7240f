"""DDP on CPU: stages under `torchrun --nproc_per_node 2` (gloo), as a multi-GPU job runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.plan.config import load_config
from harness.plan.graph import build_plan
from harness.core.rundir import write_stage_config
from harness.core.spec import spec_dict

pytestmark = pytest.mark.slow
RUNTIME = dict(device="cpu", amp="none", threads=1, log_every=0, num_workers=0)


def _torchrun(run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "harness.core.stages", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def test_pretrain_and_finetune_under_torchrun(tmp_path):
    plan = build_plan(load_config("table2", ["profile=smoke", f"results_root={tmp_path}"]))
    cell = next(c for c in plan.cells if c.row == "mae")
    for sid in (cell.pretrain, cell.finetune):
        stage = plan.stages[sid]
        plan.dir(sid).mkdir(parents=True)
        write_stage_config(plan.dir(sid), sid, spec_dict(stage.spec), plan.input_paths(stage), RUNTIME)
        _torchrun(plan.dir(sid))
        res = json.loads((plan.dir(sid) / "result.json").read_text())
        assert res["world_size"] == 2
    res = json.loads((plan.dir(cell.finetune) / "result.json").read_text())
    # 512 images, 64 per rank x 2 ranks: 4 steps/epoch; the per-epoch validation (smoke holdout: 256 images carved
    # out of the training set) counts every validation image exactly once across the two ranks
    assert json.loads((plan.dir(cell.finetune) / "log.jsonl").read_text().splitlines()[-1])["n_val"] == 256
    assert 0.0 <= res["last_val_top1"] <= 100.0
