"""What the driver submits, without running a job.

- harness.run.chains.longest_chain_first: with fewer slots than ready jobs, the ready stage with the longest chain of
  stages still to do below it goes first; teachers, then the graph's order, on a tie (the driver's loop replayed in
  simulated time).
- harness.run.launch.settle: a job that ended before its stage wrote a result or an error is submitted again, at
  most launcher.max_requeues times, then the stage fails as any other (fake jobs; and the Driver's whole loop on a
  fake executor).
"""
import json
from contextlib import contextmanager
from types import SimpleNamespace

from harness.plan.config import load_config
from harness.plan.graph import Plan, Stage, build_plan
from harness.run.chains import chain_from, longest_chain_first, stages_below
from harness.run.elsewhere import RunningElsewhere
from harness.run.launch import Driver, settle
from harness.run.progress import Progress


def _plan(tmp_path, spec):
    """spec: [(id, [input ids])] in graph order."""
    stages = {sid: Stage(sid, "pretrain", "student-pretrain", {"kind": "pretrain"},
                         {f"in{i}": d for i, d in enumerate(deps)}) for sid, deps in spec}
    return Plan("t", "p", tmp_path, stages, [])


def replay(plan, seconds, slots, decide):
    """The driver's loop on simulated time: start jobs while slots are free (in the order `decide` gives), let a
    stage's consumers become ready when it ends; returns the time the last stage ends."""
    state = {sid: "todo" for sid in plan.stages}
    jobs, busy, now = [], set(), 0.0
    while True:
        for job in jobs:
            for sid, end in job:
                if end <= now:
                    state[sid] = "done"
        jobs = [job for job in jobs if job[-1][1] > now]
        ready = [st for sid, st in plan.stages.items() if state[sid] == "todo" and sid not in busy
                 and all(state[d] == "done" for d in plan.deps(st))]
        free = slots - len(jobs)
        if ready and free > 0:
            for st in decide(plan, ready, state)[:free]:
                t, job = now, []
                for c in chain_from(plan, st, state, busy):
                    t += seconds[c.id]
                    job.append((c.id, t))
                    busy.add(c.id)
                jobs.append(job)
        ends = [end for job in jobs for _, end in job if end > now]
        if not ends:
            assert all(v == "done" for v in state.values())
            return now
        now = min(ends)


def _graph_order(plan, ready, state):
    index = {sid: i for i, sid in enumerate(plan.stages)}
    return sorted(ready, key=lambda st: index[st.id])


def test_a_short_stage_gating_a_long_one_goes_first(tmp_path):
    # c1, c2: 50 s each; x (10 s) feeds y (100 s), which the job of x runs right after it. Two slots.
    plan = _plan(tmp_path, [("c1", []), ("c2", []), ("x", []), ("y", ["x"])])
    seconds = {"c1": 50.0, "c2": 50.0, "x": 10.0, "y": 100.0}
    state = {sid: "todo" for sid in plan.stages}
    ready = [plan.stages[s] for s in ("c1", "c2", "x")]
    assert [st.id for st in longest_chain_first(plan, ready, state)] == ["x", "c1", "c2"]
    assert replay(plan, seconds, 2, _graph_order) == 160.0  # c1 | c2, then x -> y alone
    assert replay(plan, seconds, 2, longest_chain_first) == 110.0  # x -> y | c1, c2


def test_stages_below_counts_the_longest_path_of_stages_still_to_do(tmp_path):
    # a -> b -> c, a -> d; e alone
    plan = _plan(tmp_path, [("a", []), ("b", ["a"]), ("c", ["b"]), ("d", ["a"]), ("e", [])])
    todo = {sid: "todo" for sid in plan.stages}
    assert stages_below(plan, todo) == {"a": 3, "b": 2, "c": 1, "d": 1, "e": 1}
    assert stages_below(plan, dict(todo, a="done", c="done")) == {"a": 1, "b": 1, "c": 0, "d": 1, "e": 1}


def test_ties_go_to_teachers_then_graph_order(tmp_path):
    plan = _plan(tmp_path, [("b", []), ("t", []), ("a", [])])
    plan.stages["t"].role = "teacher-pretrain"
    state = {sid: "todo" for sid in plan.stages}
    ready = [plan.stages[s] for s in ("a", "b", "t")]
    assert [st.id for st in longest_chain_first(plan, ready, state)] == ["t", "b", "a"]
    assert [st.id for st in longest_chain_first(plan, ready[::-1], state)] == ["t", "b", "a"]  # deterministic


def _tiny_seconds(plan):
    """Median wall seconds per stage of the tiny-fast table2 run committed before the probes (README), by what the
    stage is; a probe, not in that run, ~8 s."""
    out = {}
    for sid, st in plan.stages.items():
        if st.kind == "probe":
            out[sid] = 8.0
        elif st.role.startswith("teacher"):
            out[sid] = {"pretrain": 298.0, "finetune": 496.0, "evaluate": 16.0}[st.kind]
        elif st.kind == "evaluate":
            out[sid] = 4.0
        elif st.kind == "finetune":
            out[sid] = 156.0 if "kdsoft" in sid else 109.0
        else:
            out[sid] = 60.0 if "-mae-" in sid else 87.0 if "-m75-" in sid else 48.0
    return out


def test_tiny_table2_ends_no_later_than_in_graph_order_and_near_the_bound(tmp_path):
    cfg = load_config("table2", ["profile=tiny-fast", f"results_root={tmp_path / 'results'}"])
    plan = build_plan(cfg)
    seconds = _tiny_seconds(plan)
    plain = replay(plan, seconds, 2, _graph_order)
    longest = replay(plan, seconds, 2, longest_chain_first)
    bound = sum(seconds.values()) / 2
    print(f"tiny table2 on 2 slots: graph order {plain:.0f} s, longest chain first {longest:.0f} s, "
          f"bound {bound:.0f} s")
    # 1935 s against a bound of 1921 s: the probes and the scratch rows (short chains) fill the gaps
    assert longest <= plain and longest <= bound * 1.02


# ------------------------------------------------------------------------------------------ resubmission (settle)
class _EndedJob:
    """A job that has ended: with `result`, or (result=None) as submitit's job that wrote no output, killed by
    `signum` (its controller's exit status)."""
    paths = None
    state = "INTERRUPTED"

    def __init__(self, job_id, result=None, signum=12, state="INTERRUPTED"):
        self.job_id, self._result, self.state = job_id, result, state
        self._process = SimpleNamespace(returncode=-signum)

    def done(self):
        return True

    def result(self):
        if self._result is None:
            raise RuntimeError(f"Job {self.job_id} has not produced any output (state: {self.state})")
        return self._result


def _write(plan, sid, name, obj):
    plan.dir(sid).mkdir(parents=True, exist_ok=True)
    (plan.dir(sid) / name).write_text(json.dumps(obj))


def test_a_job_that_ends_before_its_stage_wrote_anything_is_resubmitted_up_to_the_budget(tmp_path, capsys):
    plan = _plan(tmp_path, [("a", []), ("b", ["a"])])
    prog, resubmitted = Progress(plan), {}
    for n in (1, 2):  # killed by USR2 before submitit's handler: no result.json, no error.json
        settle(prog, _EndedJob(f"10{n}"), ["a", "b"], resubmitted, budget=2)
        assert prog.state == {"a": "todo", "b": "todo"} and resubmitted == {"a": n}
        assert (f"a: job 10{n} ended (INTERRUPTED, signal USR2) before its stage wrote a result or an error: "
                f"resubmitting, {n} of 2") in capsys.readouterr().out
    settle(prog, _EndedJob("103"), ["a", "b"], resubmitted, budget=2)  # past the budget: fails as any failure
    out = capsys.readouterr().out
    assert prog.state == {"a": "failed", "b": "blocked"} and "resubmitting" not in out
    assert "a: failed Job 103 has not produced any output (state: INTERRUPTED) (submitted 3 times)" in out


def test_a_job_the_user_cancelled_is_not_resubmitted(tmp_path, capsys):
    plan = _plan(tmp_path, [("a", [])])
    prog, resubmitted = Progress(plan), {}
    settle(prog, _EndedJob("201", signum=15, state="CANCELLED"), ["a"], resubmitted, budget=3)
    assert prog.state == {"a": "failed"} and resubmitted == {} and "resubmitting" not in capsys.readouterr().out


def test_only_a_stage_without_result_or_error_is_resubmitted(tmp_path, capsys):
    plan = _plan(tmp_path, [("a", []), ("b", ["a"]), ("c", ["b"])])
    prog, resubmitted = Progress(plan), {}
    _write(plan, "a", "result.json", {})  # the chain's first stage finished, the job died in the second
    settle(prog, _EndedJob("7", signum=9), ["a", "b", "c"], resubmitted, budget=3)
    assert prog.state == {"a": "done", "b": "todo", "c": "todo"} and resubmitted == {"b": 1}
    assert "b: job 7 ended (INTERRUPTED, signal KILL) before its stage wrote a result or an error: resubmitting, " \
           "1 of 3" in capsys.readouterr().out
    _write(plan, "b", "error.json", {"error": "NonFiniteLoss: loss is nan"})  # the stage itself failed: no retry
    settle(prog, _EndedJob("8"), ["b", "c"], resubmitted, budget=3)
    assert prog.state == {"a": "done", "b": "failed", "c": "blocked"} and resubmitted == {"b": 1}
    assert "b: failed NonFiniteLoss: loss is nan" in capsys.readouterr().out


def test_a_job_that_found_its_stage_running_elsewhere_waits_and_spends_no_resubmission(tmp_path, capsys):
    plan = _plan(tmp_path, [("a", [])])
    prog, resubmitted = Progress(plan), {}
    settle(prog, _EndedJob("9", result=RunningElsewhere("a", "pid 5 on host")), ["a"], resubmitted, budget=0)
    assert prog.state == {"a": "todo"} and resubmitted == {}
    assert "a: todo (found running elsewhere: pid 5 on host; waiting for it)" in capsys.readouterr().out


class _FakeExecutor:
    """Runs a job at once by writing its stages' result.json; the first job of `dies` ends with nothing written."""

    def __init__(self, plan, dies):
        self.plan, self.dies, self.submitted = plan, dies, []

    @contextmanager
    def batch(self):
        yield

    def submit(self, job):
        chain = [job.stage_id] + [sid for sid, *_ in job.then]
        self.submitted.append(chain)
        if job.stage_id == self.dies and [c[0] for c in self.submitted].count(self.dies) == 1:
            return _EndedJob(f"fake-{len(self.submitted)}")
        for sid in chain:
            _write(self.plan, sid, "result.json", {})
        return _EndedJob(f"fake-{len(self.submitted)}", result={})


def test_the_driver_resubmits_a_job_that_died_and_finishes_the_plan(tmp_path, capsys):
    cfg = load_config("table2", ["profile=smoke", "launcher=local", "launcher.poll_s=0.001", "launcher.max_parallel=2",
                                 f"results_root={tmp_path}"])
    plan = build_plan(cfg)
    first = longest_chain_first(plan, [st for st in plan.stages.values() if not plan.deps(st)],
                                {sid: "todo" for sid in plan.stages})[0].id
    ex = _FakeExecutor(plan, dies=first)
    states = Driver(plan, cfg, ex, slurm=False).run()
    assert set(states.values()) == {"done"}
    out = capsys.readouterr().out
    assert out.count("before its stage wrote a result or an error: resubmitting, 1 of 3") == 1
    assert [c[0] for c in ex.submitted].count(first) == 2  # once more, and nothing else twice
    assert sorted(sid for c in ex.submitted for sid in c) == sorted([*plan.stages, *ex.submitted[0]])
