"""`python -m harness.run.acceptance`: the GPU acceptance check (smoke graph, rehearsal, the benchmark's DMAE step with
its MFU) and its `--cpu` form, which CI runs; its parts fail on what they should fail on."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run import acceptance
from harness.run.acceptance import Part, check_stages, datasheet_peak, run_part

ROOT = Path(__file__).resolve().parents[1]


def test_datasheet_peaks_pick_the_right_card():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("NVIDIA H200") == 989e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert datasheet_peak("Tesla T4") is None


def test_a_part_past_its_budget_is_stopped_and_fails(tmp_path):
    part = Part("slow", [sys.executable, "-c", "import time; time.sleep(60)"])
    run_part(part, tmp_path / "slow.log", timeout_s=1)
    assert part.rc == -1 and not part.ok and "past the time budget" in part.problems[0]
    assert part.wall_s < 30
    part = Part("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    run_part(part, tmp_path / "bad.log", timeout_s=60)
    assert part.rc == 3 and "exit code 3" in part.problems[0] and "boom" in part.problems[0]


def test_stages_on_another_device_or_unfinished_fail_the_part(tmp_path):
    dirs = []
    for i, (device, amp) in enumerate([("cuda", "bf16"), ("cpu", "bf16"), (None, None)]):
        d = tmp_path / f"stage-{i}"
        d.mkdir()
        if device:
            (d / "result.json").write_text(json.dumps({"device": device, "runtime": {"amp": amp}}))
        dirs.append(d)
    part = Part("x", [])
    part.rc = 0
    assert len(check_stages(part, dirs, "cuda", "bf16")) == 2
    assert not part.ok
    assert any("1 of 3 stages did not finish" in p and "stage-2" in p for p in part.problems)
    assert any("ran elsewhere than on cuda with amp bf16: stage-1 (cpu, amp bf16)" in p for p in part.problems)
    part = Part("y", [])
    part.rc = 0
    check_stages(part, dirs[:1], "cuda", "bf16")
    assert part.ok


def test_gpu_form_without_a_gpu_says_so(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        acceptance.main([])
    assert e.value.code == 2 and "no CUDA device here" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_acceptance_runs_the_smoke_graph_the_rehearsal_and_the_dmae_step(tmp_path):
    """The --cpu form end to end (what CI runs). Its 10-minute budget is the GPU form's; a shared 2-core CI machine
    gets a longer one."""
    cmd = [sys.executable, "-m", "harness.run.acceptance", "--cpu", "--out", str(tmp_path), "--budget-min", "45"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50 * 60)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = json.loads((tmp_path / "acceptance.json").read_text())
    assert summary["ok"] and (summary["device"], summary["amp"]) == ("cpu", "none")
    parts = {x["part"]: x for x in summary["parts"]}
    assert list(parts) == ["smoke", "rehearsal", "bench"]
    assert parts["smoke"]["stages"] == parts["smoke"]["planned"] == 25  # table2: 17 trained or evaluated + 8 probes
    assert parts["rehearsal"]["stages"] == parts["rehearsal"]["planned"] == 25
    assert parts["rehearsal"]["profile"] == "smoke" and "device-hours" in parts["rehearsal"]["full_run_estimate"]
    bench = parts["bench"]
    assert bench["images_per_s"] > 0 and 0 < bench["mfu_of_measured_peak"] < 2
    assert bench["mfu_of_datasheet_peak"] is None  # a CPU has no datasheet bf16 peak here
    text = (tmp_path / "acceptance.md").read_text()
    assert text.startswith("# Acceptance: PASS") and "MFU" in text and "MFU" in p.stdout
    assert (tmp_path / "reports" / "table2.smoke.md").is_file()
    assert (tmp_path / "reports" / "rehearsal" / "table2.smoke.md").is_file()
