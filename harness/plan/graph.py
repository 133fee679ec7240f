"""Expand a table recipe into a graph of stages.

    teacher pre-train (or a provided checkpoint) -> teacher fine-tune (or provided) -> teacher evaluation (of a
    provided fine-tuned teacher too: its measured test top-1 is what the KD rows and the official number rest on)
    -> student pre-trains (MAE / DMAE, one per row and seed; none for a scratch row) -> fine-tunes (KD rows: from
    the fine-tuned teacher; scratch rows: from the seed's random initialisation) -> evaluations
    probes (probe.enabled): a kNN probe of every student pre-train's last block (a scratch row: of its random
    initialisation) and of the teacher pre-train's aligned block, on the test split

A stage's id is `<what it is>-<hash>`, the hash taken over its resolved spec, which holds its inputs' ids: equal
stages are shared (the MAE-baseline pre-train feeds the MAE and the KD rows; one teacher serves every row) and a
rerun finds finished stages by id, as does another table of the same results root (rundir.RunTree.reuse_finished).
Results live in <results_root>/<table>/<profile>/<stage id>/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from harness.plan.config import ConfigError, check_name, load_config, neutral_overrides
from harness.plan.resolve import Row, data_spec, resolve_row
from harness.core.spec import AnySpec, build_stage, spec_dict
from harness.core.rundir import (MANIFEST_FILE, MODEL_FILE, RunTree, file_of_ref, file_ref, git_commit, results_root_of,
                                 spec_hash, write_json)

MANIFEST = MANIFEST_FILE


@dataclass
class Stage:
    id: str
    kind: str  # pretrain | finetune | evaluate | probe
    # teacher-pretrain | teacher-finetune | teacher-evaluate | teacher-probe | student-pretrain | student-finetune |
    # student-probe | evaluate
    role: str
    spec: AnySpec  # harness.core.spec: typed; its dict form is config.json's spec
    inputs: Dict[str, str]  # input role -> stage id, or "file:<path>" for a provided checkpoint
    cells: List[Tuple[str, int]] = field(default_factory=list)  # (row, seed) pairs this stage serves


@dataclass
class Cell:
    """One (row, seed) of the table and the stages that produce its number."""
    row: str
    seed: int
    label: str
    method: str
    paper: Optional[str]
    pretrain: Optional[str]  # None: a scratch row (no pre-training)
    finetune: str
    evaluate: str
    teacher: Dict[str, str]  # pretrained / finetuned: the teacher stages (or files) the row reads; probe: its probe
    info: dict
    probe: Optional[str] = None  # the kNN probe of the row's pre-trained encoder (scratch: its random init)
    # what the command line changed in the row's stages against its recipe ("pretrain.mask_ratio=0.9"; empty: the
    # recipe's row). An overridden row is labelled with it; its paper number and claims are not applicable.
    overridden: List[str] = field(default_factory=list)


@dataclass
class Plan:
    table: str
    profile: str
    root: Path
    stages: Dict[str, Stage]  # in dependency order
    cells: List[Cell]

    def dir(self, stage_id: str) -> Path:
        return self.root / stage_id

    def input_paths(self, stage: Stage) -> Dict[str, str]:
        return {role: file_of_ref(ref) or str(self.dir(ref) / MODEL_FILE)
                for role, ref in stage.inputs.items()}

    def deps(self, stage: Stage) -> List[str]:
        return [ref for ref in stage.inputs.values() if file_of_ref(ref) is None]

    def check_paths(self) -> None:
        """Every stage directory is a direct child of the plan's root (nothing is written outside results_root)."""
        root = Path(os.path.normpath(self.root))
        for sid in self.stages:
            d = Path(os.path.normpath(self.dir(sid)))
            if d.parent != root or not check_name_ok(sid):
                raise ConfigError(f"stage directory {d} (stage id {sid!r}) is not inside {root}; refusing to write it")

    def siblings(self) -> Path:
        """The results root this plan's tables share (<results_root>; the plan lives in <table>/<profile>/ below)."""
        return results_root_of(self.root)


def _model_tag(m: dict) -> str:
    return f"{m['preset']}p{m['patch_size']}"


class _Builder:
    def __init__(self, cfg: DictConfig, root: Path):
        self.cfg = cfg
        self.root = root
        self.stages: Dict[str, Stage] = {}
        self.data, self.ft_data = spec_dict(data_spec(cfg)), spec_dict(data_spec(cfg, finetune=True))
        self.amp = cfg.run.amp
        self.probe = OmegaConf.to_container(cfg.probe, resolve=True)
        self.probing = self.probe.pop("enabled")

    def add(self, kind: str, role: str, desc: str, sections: dict, inputs: Dict[str, str], cell) -> str:
        """The stage of these spec sections (its id: `desc`-hash of everything but the name), added once."""
        data = self.ft_data if kind == "finetune" else self.data
        spec = build_stage(kind, name=desc, **sections, data=data, amp=self.amp, inputs=dict(inputs))
        sid = f"{desc}-{spec_hash(spec_dict(spec, name=False))[:10]}"
        if sid not in self.stages:
            self.stages[sid] = Stage(sid, kind, role, spec, dict(inputs))
        if cell not in self.stages[sid].cells:
            self.stages[sid].cells.append(cell)
        return sid

    def teacher(self, t: dict, cell, need: str) -> str:
        """The stage id (or provided file) of the teacher's `need` ('pretrained' | 'finetuned') checkpoint;
        a fine-tuned teacher brings its pre-training stage along."""
        tag, pre, fin = _model_tag(t["model"]), t["pretrain"], t["finetune"]
        if not t["train"]:
            if not t[need + "_ckpt"]:
                raise ConfigError(f"rows.{cell[0]}: needs the {need} teacher: set teacher.{need}_ckpt")
            ref = file_ref(t[need + '_ckpt'])
            if need == "finetuned":  # a provided fine-tuned teacher is measured too: every KD claim rests on it
                self.add("evaluate", "teacher-evaluate", f"teacher-evaluate-provided-{tag}",
                         {"model": t["model"], "eval_batch_size": fin["eval_batch_size"], "seed": self.cfg.seed},
                         {"model": ref}, cell)
            return ref
        pt = self.add("pretrain", "teacher-pretrain", f"teacher-pretrain-mae-{tag}-e{pre['epochs']}",
                      {"objective": "mae", "model": t["model"], "pretrain": pre, "seed": self.cfg.seed},
                      {}, cell)
        if need == "pretrained":
            return pt
        ft = self.add("finetune", "teacher-finetune", f"teacher-finetune-{tag}-e{fin['epochs']}",
                      {"model": t["model"], "finetune": fin, "kd": None, "seed": self.cfg.seed}, {"init": pt}, cell)
        # the fine-tuned teacher's test top-1, for the report (a teacher that distils must itself be good)
        self.add("evaluate", "teacher-evaluate", f"teacher-evaluate-{tag}-e{fin['epochs']}",
                 {"model": t["model"], "eval_batch_size": fin["eval_batch_size"], "seed": self.cfg.seed},
                 {"model": ft}, cell)
        return ft

    def probe_stage(self, role: str, desc: str, model: dict, block: int, seed: int, inputs: Dict[str, str],
                    cell) -> Optional[str]:
        """A kNN probe of block `block` (-1: the last) of the encoder in `inputs` (none: the seed's random init)."""
        if not self.probing:
            return None
        return self.add("probe", role, desc, {"model": model, "block": block, "probe": self.probe, "seed": seed},
                        inputs, cell)

    def cell(self, row: Row, seed: int) -> Cell:
        c = (row.key, seed)
        student, teacher_cfg, pre, fin, kd = row.student, row.teacher, row.pretrain, row.finetune, row.kd
        dis = {k: v for k, v in row.distill.items() if k != "teacher_source"}  # the stage spec's distill section
        teacher: Dict[str, str] = {}
        tag = _model_tag(student)
        mask = f"m{round(pre['mask_ratio'] * 100)}"
        if row.method == "dmae":
            source = row.distill["teacher_source"]
            ref = teacher[source] = self.teacher(teacher_cfg, c, source)
            deepest = max(t for _, t in dis["pairs"])  # the block the teacher runs up to
            probe = self.probe_stage("teacher-probe", f"teacher-probe-{source}-{_model_tag(teacher_cfg['model'])}"
                                     f"-b{deepest}", teacher_cfg["model"], deepest, self.cfg.seed, {"encoder": ref}, c)
            if probe:
                teacher["probe"] = probe
            pt = self.add("pretrain", "student-pretrain",
                          f"student-pretrain-dmae-{tag}-from-{_model_tag(teacher_cfg['model'])}-{mask}-e{pre['epochs']}"
                          f"-s{seed}", {"objective": "dmae", "model": student, "pretrain": pre, "distill": dis,
                                        "teacher_model": teacher_cfg["model"], "seed": seed},
                          {"teacher": ref}, c)
        elif row.method == "scratch":
            pt = None
        else:  # mae and kd rows share the MAE pre-training
            pt = self.add("pretrain", "student-pretrain", f"student-pretrain-mae-{tag}-{mask}-e{pre['epochs']}-s{seed}",
                          {"objective": "mae", "model": student, "pretrain": pre, "seed": seed}, {}, c)
        ft_spec = {"model": student, "finetune": fin, "kd": None, "seed": seed}
        ft_inputs = {"init": pt} if pt else {}
        of = self.stages[pt].spec.name.removeprefix("student-pretrain-") if pt else f"scratch-{tag}-s{seed}"
        probe = self.probe_stage("student-probe", f"student-probe-of-{of}", student, -1, seed,
                                 {"encoder": pt} if pt else {}, c)
        ft_desc = f"student-finetune-e{fin['epochs']}-of-{of}"
        if row.method == "kd":
            teacher["finetuned"] = self.teacher(teacher_cfg, c, "finetuned")
            ft_spec.update(kd=kd, teacher_model=teacher_cfg["model"])
            ft_inputs["kd_teacher"] = teacher["finetuned"]
            ft_desc = f"student-finetune-kd{kd['kind']}-e{fin['epochs']}-of-{of}"
        ft = self.add("finetune", "student-finetune", ft_desc, ft_spec, ft_inputs, c)
        ev = self.add("evaluate", "evaluate", "evaluate-" + self.stages[ft].spec.name.removeprefix("student-"),
                      {"model": student, "eval_batch_size": fin["eval_batch_size"], "seed": seed}, {"model": ft}, c)
        info = {"teacher": teacher_cfg["model"]["preset"] if row.method != "scratch" else None,
                "student": student["preset"], "mask_ratio": pre["mask_ratio"] if pt else None,
                "pretrain_epochs": pre["epochs"] if pt else 0, "finetune_epochs": fin["epochs"],
                "kd": kd["kind"] if row.method == "kd" else None,
                "distill": dis if row.method == "dmae" else None}
        return Cell(row.key, seed, row.label, row.method, row.paper, pt, ft, ev, teacher, info, probe)


def check_name_ok(name: str) -> bool:
    try:
        check_name("name", name)
        return True
    except ConfigError:
        return False


def build_plan(cfg: DictConfig) -> Plan:
    check_name("table", cfg.table)
    check_name("profile", cfg.profile)
    results_root = Path(cfg.results_root).resolve()
    root = results_root / cfg.table / cfg.profile
    if Path(os.path.normpath(root)).parent.parent != results_root:  # lexical: a symlinked results tree is fine
        raise ConfigError(f"results directory {root} is not <results_root>/<table>/<profile> under {results_root}")
    b = _Builder(cfg, root)
    rows = [resolve_row(cfg, key) for key in cfg.rows]
    cells = [b.cell(row, cfg.seed + s) for row in rows for s in range(cfg.seeds)]
    order = _toposort(b.stages)
    plan = Plan(cfg.table, cfg.profile, root, {sid: b.stages[sid] for sid in order}, cells)
    plan.check_paths()
    return plan


OVERRIDE_SHOWN = 3  # the label names this many changed settings, then "+N more"


def mark_overridden(plan: Plan, cfg: DictConfig, overrides: Sequence[str]) -> Dict[str, List[str]]:
    """Compare each row's stages with the recipe's (the same table composed with only the neutral overrides,
    config.NEUTRAL_OVERRIDES): a row whose stages differ gets, in every cell, the changed settings in `overridden`
    and its label ("DMAE, 95% masking [pretrain.mask_ratio=0.9]"). Returns {row: changed settings}. Stage ids are
    content hashes over the whole chain, so an unchanged evaluation id is an unchanged row."""
    neutral = neutral_overrides(list(overrides))
    if len(neutral) == len(overrides):
        return {}
    base = build_plan(load_config(cfg.table, neutral, check=False))
    recipe = {(c.row, c.seed): c for c in base.cells}
    changed: Dict[str, List[str]] = {}
    for c in plan.cells:
        b = recipe.get((c.row, c.seed))
        if c.row in changed or (b is not None and b.evaluate == c.evaluate):
            continue
        if b is None:
            changed[c.row] = ["a row not in the recipe"]
            continue
        diff: List[str] = []
        if c.method != b.method:
            diff.append(f"method={c.method}")
        for mine, theirs, prefix in ((c.pretrain, b.pretrain, ""), (c.finetune, b.finetune, ""),
                                     (c.evaluate, b.evaluate, "")):
            diff += _spec_diff(plan, mine, base, theirs, prefix)
        for role in sorted(set(c.teacher) | set(b.teacher)):
            if role != "probe":
                diff += _spec_diff(plan, c.teacher.get(role), base, b.teacher.get(role), "teacher.")
        changed[c.row] = list(dict.fromkeys(diff)) or ["its stages"]
    for c in plan.cells:
        if c.row in changed:
            c.overridden = changed[c.row]
            shown = changed[c.row][:OVERRIDE_SHOWN]
            more = len(changed[c.row]) - len(shown)
            c.label = f"{c.label} [{'; '.join(shown)}{f'; +{more} more' if more else ''}]"
    return changed


def _spec_diff(plan: Plan, sid: Optional[str], base: Plan, bid: Optional[str], prefix: str) -> List[str]:
    """The settings of stage `sid` (of plan) that differ from stage `bid` (of base) as "<key>=<value>" (dotted spec
    keys; inputs left out: the chain is compared stage by stage). A teacher's chain is followed to its pre-train."""
    if sid == bid:
        return []
    if sid is None or bid is None or file_of_ref(sid) or file_of_ref(bid):
        return [f"{prefix}{'stage' if sid else 'no stage'}: {sid or bid}"] if (sid or bid) else []
    a, b = plan.stages[sid].spec, base.stages[bid].spec
    mine, theirs = _flat(spec_dict(a)), _flat(spec_dict(b))
    out = [f"{_config_key(k, prefix)}={v}" for k, v in mine.items()
           if k not in ("name", "kind", "seed") and not k.startswith("inputs.") and theirs.get(k, object()) != v]
    out += [f"{_config_key(k, prefix)}=None" for k in theirs if k not in mine and not k.startswith("inputs.")]
    if prefix == "teacher.":  # a teacher's fine-tune reads its pre-train: follow it
        for role in set(a.inputs) & set(b.inputs):
            out += _spec_diff(plan, a.inputs[role], base, b.inputs[role], prefix)
    return out


def _config_key(spec_key: str, prefix: str) -> str:
    """A stage spec's key as the config names it: a student stage's model.* is student.*, a DMAE pre-train's
    teacher_model.* is teacher.model.*, a teacher stage's keys are under teacher."""
    if spec_key.startswith("teacher_model."):
        return "teacher.model." + spec_key.removeprefix("teacher_model.")
    if prefix != "teacher." and spec_key.startswith("model."):
        return "student." + spec_key.removeprefix("model.")
    return prefix + spec_key


def _flat(d: dict, head: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{head}{k}."))
        else:
            out[f"{head}{k}"] = v
    return out


def _toposort(stages: Dict[str, Stage]) -> List[str]:
    order, seen = [], set()

    def visit(sid: str) -> None:
        if sid in seen:
            return
        seen.add(sid)
        for ref in stages[sid].inputs.values():
            if file_of_ref(ref) is None:
                visit(ref)
        order.append(sid)

    for sid in stages:
        visit(sid)
    return order


def write_manifest(plan: Plan, cfg: DictConfig, command: str, overrides: List[str]) -> Path:
    """Everything the report needs to map stage results back to table rows, plus provenance."""
    plan.root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "table": plan.table, "profile": plan.profile, "title": cfg.title, "profile_note": cfg.profile_note,
        "command": command, "overrides": list(overrides), "git_commit": git_commit(), "seeds": cfg.seeds,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "cells": [c.__dict__ for c in plan.cells],
        "stages": {s.id: {"kind": s.kind, "role": s.role, "name": s.spec.name, "inputs": s.inputs,
                          "cells": s.cells} for s in plan.stages.values()},
    }
    path = plan.root / MANIFEST
    write_json(manifest, path)
    (plan.root / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return path


def describe(plan: Plan, estimates: Optional[Dict[str, float]] = None,
             earlier: Optional[Dict[str, str]] = None) -> str:
    """The --dry-run listing: each stage, whether it is done, what it needs, and an estimated cost. A stage finished
    in another table of the results root is `reused` (linked in, not run); one that a table run earlier by the same
    command computes (earlier: {stage id: table}, `all`) is `shared`: neither counts in the remaining compute."""
    lines = [f"Plan for {plan.table} ({plan.profile}): {len(plan.stages)} stages, {len(plan.cells)} table cells",
             f"results: {plan.root}"]
    total, n_free = 0.0, 0
    tree = RunTree.of(plan)
    stale = tree.stale()
    for s in plan.stages.values():
        st, note = ("stale", f"stale: {stale[s.id]}; would be moved aside and recomputed") if s.id in stale \
            else (tree.status(s.id), "")
        if st != "done" and s.id not in stale:
            src = tree.finished_elsewhere(s.id)
            if src is not None:
                st, note = "reused", f"finished in {src.parent.parent.name}: would be linked in, not run"
            elif (earlier or {}).get(s.id):
                st, note = "shared", f"computed for {earlier[s.id]} earlier in this run"
        est = (estimates or {}).get(s.id)
        free = st in ("done", "reused", "shared")
        if est is not None and not free:
            total += est
        n_free += st in ("reused", "shared")
        needs = ", ".join(f"{r}={ref}" for r, ref in s.inputs.items()) or "-"
        cost = st if free else f"~{est / 60:.1f} min" if est is not None else "cost unknown"
        serves = ", ".join(f"{r}/s{sd}" for r, sd in s.cells)
        lines.append(f"  [{st:>7}] {s.id}\n            needs: {needs}\n            serves: {serves}; {cost}"
                     + (f"\n            {note}" if note else ""))
    if estimates:
        lines.append(f"Estimated remaining compute: ~{total / 60:.1f} min"
                     + (f" ({n_free} stage(s) reused or shared, not counted)" if n_free else ""))
    return "\n".join(lines)

