"""harness.run.dispatch: with fewer slots than ready jobs, the driver starts first the job that lets the whole run end
soonest in a simulation from the stage estimates; the plain order (teachers first, graph order) otherwise."""
from harness.run import dispatch
from harness.plan.config import load_config
from harness.run.launch import chain_from
from harness.plan.graph import Plan, Stage, build_plan


def _plan(tmp_path, spec):
    """spec: [(id, [input ids])] in graph order."""
    stages = {sid: Stage(sid, "pretrain", "student-pretrain", {"kind": "pretrain"},
                         {f"in{i}": d for i, d in enumerate(deps)}) for sid, deps in spec}
    return Plan("t", "p", tmp_path, stages, [])


def _jobs(plan):
    return lambda st, state, busy: chain_from(plan, st, state, busy)


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
            running = [[(sid, end - now) for sid, end in job if end > now] for job in jobs]
            for st in decide(plan, ready, free, state, running)[:free]:
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


def _plain(plan, ready, free, state, running):
    return sorted(ready, key=dispatch.plain_key(plan))


def _simulated(seconds, slots):
    return lambda plan, ready, free, state, running: dispatch.order(plan, ready, free, state, running, slots, seconds,
                                                                    _jobs(plan))


def test_a_short_stage_gating_a_long_one_goes_first(tmp_path):
    # c1, c2: 50 s each; x (10 s) feeds y (100 s), which the job of x runs right after it. Two slots.
    plan = _plan(tmp_path, [("c1", []), ("c2", []), ("x", []), ("y", ["x"])])
    seconds = {"c1": 50.0, "c2": 50.0, "x": 10.0, "y": 100.0}
    state = {sid: "todo" for sid in plan.stages}
    ready = [plan.stages[s] for s in ("c1", "c2", "x")]
    assert [st.id for st in _plain(plan, ready, 2, state, [])] == ["c1", "c2", "x"]
    first = dispatch.order(plan, ready, 2, state, [], 2, seconds, _jobs(plan))
    assert {st.id for st in first[:2]} == {"x", "c1"} and sorted(st.id for st in first) == ["c1", "c2", "x"]
    assert replay(plan, seconds, 2, _plain) == 160.0  # c1 | c2, then x -> y alone
    assert replay(plan, seconds, 2, _simulated(seconds, 2)) == 110.0  # x -> y | c1, c2


def test_plain_order_without_a_choice_or_without_estimates(tmp_path):
    plan = _plan(tmp_path, [("b", []), ("t", [])])
    plan.stages["t"].role = "teacher-pretrain"
    state = {"b": "todo", "t": "todo"}
    ready = list(plan.stages.values())
    for free, seconds in ((2, {"b": 1.0, "t": 9.0}), (1, None), (1, {"b": 1.0}), (0, {"b": 1.0, "t": 9.0})):
        assert [st.id for st in dispatch.order(plan, ready, free, state, [], 2, seconds, _jobs(plan))] == ["t", "b"]


def test_running_jobs_count_with_the_time_they_have_left(tmp_path):
    plan = _plan(tmp_path, [("r", []), ("a", []), ("b", ["a"])])
    seconds = {"r": 100.0, "a": 5.0, "b": 5.0}
    state = {"r": "submitted", "a": "todo", "b": "todo"}
    # r still has 100 s to run in the other slot: a -> b ends at 10, the run at 100
    assert dispatch.simulate(plan, state, [[("r", 100.0)]], 2, seconds, _jobs(plan)) == 100.0
    assert dispatch.simulate(plan, state, [[("r", 3.0)]], 2, seconds, _jobs(plan)) == 10.0


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


def test_tiny_table2_ends_no_later_than_in_plain_order_and_near_the_bound(tmp_path):
    cfg = load_config("table2", ["profile=tiny-fast", f"results_root={tmp_path / 'results'}"])
    plan = build_plan(cfg)
    seconds = _tiny_seconds(plan)
    plain = replay(plan, seconds, 2, _plain)
    simulated = replay(plan, seconds, 2, _simulated(seconds, 2))
    bound = sum(seconds.values()) / 2
    print(f"tiny table2 on 2 slots: plain {plain:.0f} s, simulated {simulated:.0f} s, bound {bound:.0f} s")
    # with the probes and the scratch rows (short chains that fill the gaps) the plain order is already within 1% of
    # the bound here (1935 s against 1921 s); before them the simulation saved 70 s (1762 -> 1692 s)
    assert simulated <= plain and simulated <= bound * 1.02
