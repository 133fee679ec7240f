"""Which stages one job runs, and which ready job the driver starts first.

A job runs a chain: a ready stage and, after it in the same process, the stages that consume it (a row's pre-train
-> fine-tune -> evaluate: one Python start-up and one queue wait instead of three). With fewer free slots than ready
jobs (launcher.max_parallel), the ready stage with the longest chain of stages still to do below it goes first: a
long chain started last would run alone at the end while the other slots idle. Only the order changes: every stage
is seeded on its own, so its result does not depend on when it runs.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from harness.plan.graph import Plan, Stage


def chain_from(plan: Plan, first: Stage, state: Dict[str, str], busy: set) -> List[Stage]:
    """The stages one job runs, starting with `first` (ready): then, repeatedly, the first stage in graph order that
    consumes the chain's last stage, is still to do and not in flight (`busy`), and needs nothing outside the chain
    that is not done. An evaluation follows its fine-tune; a pre-train with two consumers (the MAE baseline feeds
    the MAE and the KD rows) takes one along and leaves the other to a job of its own, which starts as soon as the
    pre-train's result appears. A probe (seconds of work) of a stage in the chain, or of a random initialisation
    for a cell the chain serves (a scratch row), joins it at the end rather than start a job of its own."""
    chain, ids = [first], {first.id}

    def ready(st: Stage, after) -> bool:
        deps = plan.deps(st)
        follows = any(a in deps for a in after) if deps else \
            st.kind == "probe" and any(set(map(tuple, st.cells)) & set(map(tuple, c.cells)) for c in chain)
        return st.id not in ids and st.id not in busy and state.get(st.id) == "todo" and follows \
            and all(d in ids or state.get(d) == "done" for d in deps)
    while True:
        nxt = next((st for st in plan.stages.values() if st.kind != "probe" and ready(st, [chain[-1].id])), None) \
            or next((st for st in plan.stages.values() if st.kind == "probe" and ready(st, ids)), None)
        if nxt is None:
            return chain
        chain.append(nxt)
        ids.add(nxt.id)


def joins_a_chain(plan: Plan, stage: Stage, state: Dict[str, str], busy: set) -> bool:
    """A probe of a random initialisation (no input) waits to join the job of a stage of its cell still to start
    (chain_from), rather than take a job of its own."""
    if stage.kind != "probe" or plan.deps(stage):
        return False
    cells = set(map(tuple, stage.cells))
    return any(st.kind != "probe" and st.id not in busy and state.get(st.id) == "todo"
               and cells & set(map(tuple, st.cells)) for st in plan.stages.values())


def stages_below(plan: Plan, state: Dict[str, str]) -> Dict[str, int]:
    """{stage id: the most stages still to do on one path from it down the graph, itself included}."""
    consumers: Dict[str, List[str]] = {sid: [] for sid in plan.stages}
    for st in plan.stages.values():
        for dep in plan.deps(st):
            consumers.setdefault(dep, []).append(st.id)
    below: Dict[str, int] = {}
    for sid in reversed(list(plan.stages)):  # dependency order: a stage's consumers come after it
        below[sid] = int(state.get(sid) != "done") + max((below[c] for c in consumers[sid]), default=0)
    return below


def longest_chain_first(plan: Plan, ready: Sequence[Stage], state: Dict[str, str]) -> List[Stage]:
    """`ready` in the order the driver starts them: the longest chain of stages still to do below a stage first
    (stages_below); on a tie teachers first (they gate most of the graph), then the graph's order."""
    below = stages_below(plan, state)
    index = {sid: i for i, sid in enumerate(plan.stages)}
    return sorted(ready, key=lambda st: (-below[st.id], not st.role.startswith("teacher"), index[st.id]))
