"""Which ready jobs the driver starts first when it has fewer free slots than ready jobs (launcher.max_parallel).

The plain order is the graph's, teachers first. With a small slot count (two cores run table2's 16 jobs two at a
time) the order decides how the run ends: one long chain started last runs alone while the other slot idles. So,
when per-stage estimates are known (harness.bench.estimate, the figures --dry-run prints), each candidate is tried as
the
next job in a simulation of the rest of the run (every later choice in the plain order), and the one that finishes
the whole run earliest goes first; ties keep the plain order. Simulated jobs are formed as the driver forms them
(the same chain rule), and a stage's consumers become ready when it finishes, also in the middle of its job.

Only the order changes: every stage is seeded on its own, so its result does not depend on when it runs.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from harness.plan.graph import Plan, Stage

MAX_CANDIDATES = 24  # the first ones in the plain order; a simulation costs O(stages^2), so large plans stay cheap
MAX_STAGES = 400  # beyond this the plain order is used (a Slurm plan has no slot limit anyway)

Chain = Callable[[Stage, Dict[str, str], set], List[Stage]]  # (ready stage, states, busy ids) -> the job's stages


def plain_key(plan: Plan) -> Callable[[Stage], Tuple[bool, int]]:
    """Teachers first (they gate most of the graph), then the graph's order."""
    index = {sid: i for i, sid in enumerate(plan.stages)}
    return lambda st: (not st.role.startswith("teacher"), index[st.id])


def simulate(plan: Plan, state: Dict[str, str], running: Sequence[Sequence[Tuple[str, float]]], slots: int,
             seconds: Dict[str, float], chain: Chain, first: Sequence[Stage] = ()) -> float:
    """Seconds until every stage still to do has finished, if the jobs in `first` start now (in that order) and
    every later start follows the plain order. `running`: each running job's unfinished stages with the seconds
    each has left, in job order; `seconds`: each stage's estimated wall time."""
    key = plain_key(plan)
    state = dict(state)
    ends: List[List[Tuple[str, float]]] = []  # per job in flight: (stage, end time), in order
    for job in running:
        t, job_ends = 0.0, []
        for sid, left in job:
            t += left
            job_ends.append((sid, t))
        if job_ends:
            ends.append(job_ends)
    busy = {sid for job in ends for sid, _ in job}
    forced, now = list(first), 0.0
    while True:
        for job in ends:
            for sid, end in job:
                if end <= now:
                    state[sid] = "done"
        ends = [job for job in ends if job[-1][1] > now]
        while len(ends) < slots:
            ready = [st for sid, st in plan.stages.items()
                     if state.get(sid) == "todo" and sid not in busy
                     and all(state.get(d) == "done" for d in plan.deps(st))]
            if not ready:
                break
            pick = forced.pop(0) if forced and forced[0] in ready else min(ready, key=key)
            t, job_ends = now, []
            for st in chain(pick, state, busy):
                t += seconds.get(st.id, 0.0)
                job_ends.append((st.id, t))
                busy.add(st.id)
            ends.append(job_ends)
        pending = [end for job in ends for _, end in job if end > now]
        if not pending:
            return now
        now = min(pending)


def order(plan: Plan, ready: Sequence[Stage], free: int, state: Dict[str, str],
          running: Sequence[Sequence[Tuple[str, float]]], slots: int, seconds: Optional[Dict[str, float]],
          chain: Chain) -> List[Stage]:
    """`ready` in the order the driver should start them, the first `free` chosen one by one by simulation
    (module docstring); the plain order when there is no choice or a stage to do has no estimate."""
    plain = sorted(ready, key=plain_key(plan))
    todo = [sid for sid, v in state.items() if v == "todo"]
    if (free <= 0 or len(plain) <= free or seconds is None or len(plan.stages) > MAX_STAGES
            or any(sid not in seconds for sid in todo)):
        return plain
    chosen: List[Stage] = []
    rest = list(plain)
    for _ in range(free):
        candidates = rest[:MAX_CANDIDATES]
        finish = [simulate(plan, state, running, slots, seconds, chain, chosen + [c]) for c in candidates]
        best = candidates[finish.index(min(finish))]  # index() keeps the plain order on ties
        chosen.append(best)
        rest.remove(best)
    return chosen + rest
