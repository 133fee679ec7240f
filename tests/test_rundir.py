"""harness.core.rundir owns what a stage directory's files mean: its status (one definition for the planner, launcher,
estimator and collector) and its per-epoch log."""
import json

from harness.core import rundir
from harness.core.rundir import DONE, FAILED, PARTIAL, TODO, epochs_logged, read_log, stage_status


def test_status_from_the_files(tmp_path):
    d = tmp_path / "s"
    assert stage_status(d) == TODO  # no directory yet
    d.mkdir()
    assert stage_status(d) == TODO
    for name in (rundir.JOB_FILE, rundir.LAST_CHECKPOINT, rundir.LOG_FILE):  # each alone says: started, unfinished
        (d / name).write_text('{"epoch": 1}\n')
        assert stage_status(d) == PARTIAL, name
        (d / name).unlink()
    (d / rundir.LOG_FILE).write_text('{"epo')  # a first line still being written: nothing logged yet
    assert stage_status(d) == TODO
    (d / rundir.ERROR_FILE).write_text("{}")
    assert stage_status(d) == FAILED
    (d / rundir.RESULT_FILE).write_text("{}")  # a later successful attempt wins over an old error
    assert stage_status(d) == DONE


def test_log_records_skip_lines_being_written_and_name_damaged_ones(tmp_path):
    lines = [json.dumps({"epoch": 1}), "", "[1, 2]", json.dumps({"epoch": 2}), '{"epoch": 3, "lo']
    (tmp_path / rundir.LOG_FILE).write_text("\n".join(lines))
    warnings = []
    assert read_log(tmp_path, warnings) == [{"epoch": 1}, {"epoch": 2}] and epochs_logged(tmp_path) == 2
    assert len(warnings) == 2 and "line 3" in warnings[0] and "line 5" in warnings[1]
    assert read_log(tmp_path / "missing") == [] and epochs_logged(tmp_path / "missing") == 0


def test_a_stage_is_done_only_while_its_model_has_the_sha256_its_result_records(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    (d / rundir.MODEL_FILE).write_bytes(b"weights")
    assert rundir.damaged(d) is None  # not finished: nothing to check
    rundir.write_json({"model_sha256": rundir.sha256_file(d / rundir.MODEL_FILE)}, d / rundir.RESULT_FILE)
    assert rundir.damaged(d) is None
    (d / rundir.MODEL_FILE).write_bytes(b"weig")  # truncated: another size, so the per-process cache hashes it again
    why = rundir.damaged(d)
    assert why and "damaged" in why and str(d / rundir.MODEL_FILE) in why
    other = tmp_path / "elsewhere" / "t" / "p" / "stage"
    other.parent.mkdir(parents=True)
    rundir.link_stage_dir(d, other)
    assert rundir.find_finished("stage", "p", [tmp_path / "elsewhere"], tmp_path / "x") is None  # never reused
    (d / rundir.MODEL_FILE).unlink()
    assert "missing" in rundir.damaged(d)
    rundir.write_json({"top1": 50.0}, d / rundir.RESULT_FILE)  # an evaluation: no artefact recorded
    assert rundir.damaged(d) is None
