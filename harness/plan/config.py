"""Composing a table's config: recipes/<table>.yaml with command-line style overrides (hydra-core's compose API),
checked before anything runs against the schema (harness.plan.schema) and its field rules, rows resolved
(harness.plan.resolve), then the checks that span several fields. Its errors (ConfigError) name the key, what is wrong
and the closest known name; overrides that would be ignored are refused, and overrides that change no row's stages are
told apart (neutral_overrides).

    >>> cfg = load_config("table2", ["profile=smoke", "seeds=2"])
"""
from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

import recipes

from harness.core.arch import PRESETS
from harness.plan.resolve import closest, resolve_row, unknown_key
from harness.core.rules import NAME, RULE, PlainName
from harness.plan.schema import (CLAIM_SOURCES, CLAIM_TESTS, ROW_SECTIONS, ConfigError, LauncherConfig, RowConfig,
                                 TableConfig, section_schema)

RECIPES_DIR = recipes.path()


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="table_schema", node=TableConfig)
    cs.store(group="launcher", name="local_schema", node=LauncherConfig, package="launcher")


register()


def _searchpath_override(table_dir) -> List[str]:
    """hydra.searchpath for the compose of a table found in `table_dir`: the other folders of the recipe search path,
    in order (hydra looks in the table's folder first, then in these: a user's table gets the package's profiles)."""
    others = [d for d in recipes.search_path() if d.resolve() != Path(table_dir).resolve()]
    if not others:
        return []
    quoted = ",".join("'file://" + str(d).replace("\\", "\\\\").replace("'", "\\'") + "'" for d in others)
    return [f"hydra.searchpath=[{quoted}]"]


def load_config(table: str, overrides: Optional[List[str]] = None, check: bool = True) -> DictConfig:
    """Compose recipes/<table>.yaml with command-line style overrides (hydra's compose API); check=False skips the
    semantic checks (validate, and launcher keys the chosen launcher would ignore), for a caller that completes the
    config first (--rehearse)."""
    try:
        known = recipes.tables()
    except NotADirectoryError as e:
        raise ConfigError(str(e)) from None
    if table not in known:
        raise ConfigError(f"unknown table {table!r}{did_you_mean(table, known)} (recipes: {', '.join(known)})")
    overrides = list(overrides or [])
    parsed = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        for o in parsed:
            # compose() accepts hydra.* and hydra/<group> and drops them: this harness has no hydra app to use them
            if o.key_or_group.replace("/", ".").split(".")[0] == "hydra":
                raise ConfigError(
                    f"{o.input_line}: hydra's own settings (hydra.*) are not used by this harness, which composes "
                    "the recipe with hydra but runs it itself. Use its keys: results_root=<dir> (run folders, "
                    "default results), reports_dir=<dir> (reports, default reports), launcher=local|slurm|debug "
                    "and launcher.* (where stages run), -m key=a,b (sweeps)")
        where = recipes.table_dir(table)
        with initialize_config_dir(config_dir=str(where), version_base="1.3"):
            cfg = compose(config_name=table, overrides=_searchpath_override(where) + overrides)
    except (HydraException, OmegaConfBaseException, YAMLError) as e:
        msg = str(e)
        hint = _override_error(table, parsed, msg)
        if hint:
            raise ConfigError(hint) from None
        cause = e.__cause__ or e.__context__  # hydra's "Error merging override x=y" hides the reason here
        reason = str(cause).strip().split("\n")[0] if cause is not None else ""
        if reason and reason not in msg:
            first, _, rest = msg.partition("\n")
            msg = f"{first}: {reason}" + (f"\n{rest}" if rest else "")
        raise ConfigError(msg) from None
    if check:
        validate(cfg)
        check_launcher_overrides(cfg, parsed)
        check_accum_overrides(cfg, parsed)
    return cfg


# ------------------------------------------------------------------------------------ unknown keys: did you mean
def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """'; did you mean <prefix><closest>?' (or 'a or b'), '' when nothing is close."""
    close = closest(word, choices)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def _override_error(table: str, parsed, msg: str) -> Optional[str]:
    """One clear message for hydra's refusal of an override, when it comes from an unknown key, row or group option:
    the key, what is wrong and the closest known name; None for any other error (hydra's own message is kept).
    Replaces hydra's hint 'To append to your config use +key=value' where appending would fail too."""
    m = re.search(r"Could not find '([^'/]+)/([^']*)'", msg)
    if m:
        group, name = m.groups()
        options = recipes.options(group)
        return (f"{group}={name}: Could not find '{group}/{name}'{did_you_mean(name, options, f'{group}=')}"
                + (f" ({group} options: {', '.join(options)})" if options else ""))
    rows = _recipe_rows(table)
    for o in parsed:
        key = o.key_or_group
        if f"'{key}'" not in msg and o.input_line not in msg:
            continue
        u = unknown_key(key, rows)
        if u is None:
            return None
        verb = "delete" if o.is_delete() else "add" if o.is_add() or o.is_force_add() else "override"
        return f"Could not {verb} '{key}': {u.describe(table)}"
    return None


def _recipe_rows(table: str) -> set:
    """Row keys written in the table's recipe file (empty when there is no such file)."""
    path = recipes.find(f"{table}.yaml")
    if path is None or not path.is_file():
        return set()
    return set((OmegaConf.load(path).get("rows") or {}).keys())


# Launcher keys only the Slurm launcher (or a launcher.write_sbatch script) reads: local and debug ignore them
# (harness.run.executors.local_executor passes timeout_min, max_requeues, gpus_per_node, tasks_per_node and
# signal_delay_s; launch.execute reads max_parallel, chain and poll_s).
SLURM_ONLY = ("partition", "account", "qos", "nodes", "cpus_per_task", "mem_gb", "mem_gb_per_gpu", "array_parallelism",
              "additional_parameters", "setup", "snapshot")


def check_launcher_overrides(cfg: DictConfig, parsed) -> None:
    """A Slurm-only launcher key set on the command line under launcher=local|debug would be ignored: refused. (A
    profile may set them for every launcher; only what the user asked for is checked.)"""
    name = cfg.launcher.name
    if name == "slurm" or cfg.launcher.write_sbatch:
        return
    given = []
    for o in parsed:
        parts = o.key_or_group.split(".")
        if len(parts) >= 2 and parts[0] == "launcher" and parts[1] in SLURM_ONLY and not o.is_delete():
            given.append(o.input_line)
    if given:
        raise ConfigError(f"{', '.join(given)}: would be ignored by launcher={name}, which runs "
                          f"{'the stages in this process' if name == 'debug' else 'jobs on this machine'} "
                          f"(Slurm-only launcher keys: {', '.join(SLURM_ONLY)}). Drop "
                          f"{'it' if len(given) == 1 else 'them'}, or add launcher=slurm")


def check_accum_overrides(cfg: DictConfig, parsed) -> None:
    """An accum_iter set on the command line for a section whose effective_batch is set (the paper profile's) would
    be replaced by the one derived from effective_batch: refused, naming both keys."""
    for o in parsed:
        parts = o.key_or_group.split(".")
        if len(parts) < 2 or parts[-1] != "accum_iter" or parts[-2] not in ("pretrain", "finetune") or o.is_delete():
            continue
        section = parts[:-1]  # [rows, <row>,] [teacher,] pretrain|finetune
        candidates = [section] + ([section[2:]] if section[0] == "rows" and len(section) > 2 else [])
        for path in candidates:
            node = cfg
            for p in path:
                node = node.get(p) if node is not None and hasattr(node, "get") else None
            if node is None or not hasattr(node, "get") or "effective_batch" not in node:
                continue  # a row without its own effective_batch: the table's applies
            eff = node.get("effective_batch")
            if eff is None:
                break
            key = ".".join(path)
            raise ConfigError(f"{o.input_line}: would be ignored, because {key}.effective_batch={eff} is set (profile "
                              f"{cfg.profile}) and accum_iter is derived from it: effective_batch / (batch_size x "
                              f"devices). Set {key}.effective_batch instead, or {key}.effective_batch=null to give "
                              "accum_iter yourself")


# Overrides that do not change what a row computes, only where, how fast or how many times (issue: honest
# overrides): a row they alone touch keeps its label, paper number and claims. Everything else that changes a row's
# stages marks the row as overridden (harness.plan.graph.mark_overridden). Keys below rows.<row>. count by their
# section.
NEUTRAL_OVERRIDES = ("profile", "launcher", "seed", "seeds", "results_root", "reports_dir", "dry_run", "report",
                     "run", "checkpoints", "data.root", "teacher.pretrained_ckpt", "teacher.finetuned_ckpt", "title",
                     "gates", "probe")


def is_neutral(key: str) -> bool:
    """Whether an override of `key` (a dotted key or a group, e.g. launcher) is declared neutral."""
    k = key.replace("/", ".")
    if k.startswith("rows."):
        k = ".".join(k.split(".")[2:])
    return any(k == n or k.startswith(n + ".") for n in NEUTRAL_OVERRIDES)


def neutral_overrides(overrides: List[str]) -> List[str]:
    """The neutral ones of command-line overrides, as given (the recipe as run, less what changes a row)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if is_neutral(o.key_or_group)]


# ------------------------------------------------------------------------------------------------------ checks
def check_name(what: str, value) -> None:
    """table, profile and row keys become path components (results/<table>/<profile>/, report figures): plain names
    only, no '/', no '..'."""
    problem = PlainName().problem(what, value)
    if problem:
        raise ConfigError(problem)


def check_fields(where: str, values, schema, skip=()) -> None:
    """The one check of the rules written on the schema's fields (harness.plan.schema: one_of, in_range, at_least,
    above, plain_name): each field of dataclass `schema` that the mapping `values` holds, at key `where` ('' = the top
    level), and the sections below them, less the fields named in `skip`."""
    for f in fields(schema):
        if f.name in skip or f.name not in values:
            continue
        key = f"{where}.{f.name}" if where else f.name
        problem = f.metadata[RULE].problem(key, values[f.name]) if RULE in f.metadata else None
        if problem:
            raise ConfigError(problem)
        below = section_schema(schema, f.name)
        if is_dataclass(below) and values[f.name] is not None:
            check_fields(key, values[f.name], below)


def check_schedule(where: str, sec: dict) -> None:
    """What a resolved pretrain or finetune section's field rules cannot say: warmup within the epochs, and an even
    batch with mixup/cutmix."""
    if not 0 <= sec["warmup_epochs"] <= sec["epochs"]:
        raise ConfigError(f"{where}.warmup_epochs={sec['warmup_epochs']} must be within [0, epochs]")
    if sec.get("mixup", 0) + sec.get("cutmix", 0) > 0 and sec["batch_size"] % 2:
        raise ConfigError(f"{where}.batch_size={sec['batch_size']} must be even with mixup/cutmix")


def validate(cfg: DictConfig) -> None:
    """Semantic checks: the schema again, the rules on every field (check_fields; a row's sections once the row is
    resolved, check_row), and the checks that span several fields."""
    try:  # hydra lets `+section.key=...` add keys to a structured config: re-check the whole tree against the schema
        OmegaConf.merge(OmegaConf.structured(TableConfig), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        u = unknown_key(key, set(cfg.rows.keys()) | _recipe_rows(cfg.table)) if key != "?" else None
        better = f"; did you mean {u.suggestion}?" if u is not None and u.suggestion else ""
        raise ConfigError(f"{key}: {str(e).splitlines()[0]} (unknown key or wrong type){better}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing mandatory value(s): {', '.join(missing)} (set them on the command line, "
                          f"e.g. {missing[0]}=...)")
    check_fields("", cfg, TableConfig, skip=ROW_SECTIONS)
    la, d = cfg.launcher, cfg.data
    if la.signal_delay_s is not None and not 0 <= la.signal_delay_s < 60 * la.timeout_min:
        raise ConfigError(f"launcher.signal_delay_s={la.signal_delay_s} must be in [0, timeout_min x 60 = "
                          f"{60 * la.timeout_min})")
    if d.finetune_subset and d.train_subset and d.finetune_subset > d.train_subset:
        raise ConfigError(f"data.finetune_subset={d.finetune_subset} exceeds data.train_subset={d.train_subset}: "
                          "fine-tuning reads a subset of the pre-training images")
    for n in ("pretrained_ckpt", "finetuned_ckpt"):
        if cfg.teacher.train and cfg.teacher[n]:
            raise ConfigError(f"teacher.{n}={cfg.teacher[n]!r} is given but teacher.train=true (profile "
                              f"{cfg.profile}): the harness trains its own teacher and would ignore that file. Add "
                              f"teacher.train=false to use provided checkpoints, or drop teacher.{n}")
    if not cfg.rows:
        raise ConfigError(f"table {cfg.table!r} has no rows")
    for rkey in cfg.rows:
        check_row(cfg, rkey)
    if la.gpus_per_node and cfg.run.device == "cpu":
        raise ConfigError("launcher.gpus_per_node > 0 with run.device=cpu")
    if la.name == "local" and cfg.run.device == "cuda" and not la.gpus_per_node:
        raise ConfigError("run.device=cuda with launcher=local and launcher.gpus_per_node=0: submitit's local executor "
                          "shows a job only the GPUs it asks for (CUDA_VISIBLE_DEVICES), so every stage would find no "
                          "GPU. Set launcher.gpus_per_node=1 (or the GPUs a stage should use)")
    if la.gpus_per_node and la.tasks_per_node and la.tasks_per_node != la.gpus_per_node:
        raise ConfigError(f"launcher.tasks_per_node={la.tasks_per_node} with gpus_per_node={la.gpus_per_node}: a GPU "
                          "job runs one task per GPU (leave tasks_per_node at 0)")
    validate_claims(cfg)


def check_row(cfg: DictConfig, rkey: str) -> None:
    """Row `rkey`: its key and method, then the rules of its resolved sections and what spans them (schedules, patch
    size, teacher checkpoints, aligned blocks)."""
    row, where = cfg.rows[rkey], f"rows.{rkey}"
    check_name("row key", rkey)
    check_fields(where, row, RowConfig, skip=ROW_SECTIONS)
    if row.method == "scratch":
        ignored = [f"{where}.{k}" for k in ("pretrain", "distill", "kd", "teacher") if row[k]]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)}: a scratch row has no pre-training and no teacher, so this "
                              "would be ignored; remove it")
    r = resolve_row(cfg, rkey)
    student, teacher, dis = r.student, r.teacher, r.distill
    for name, schema in ROW_SECTIONS.items():
        check_fields(f"{where}.{name}", getattr(r, name), schema)
    for name, sec in (("pretrain", r.pretrain), ("finetune", r.finetune), ("teacher.pretrain", teacher["pretrain"]),
                      ("teacher.finetune", teacher["finetune"])):
        check_schedule(f"{where}.{name}", sec)
    for who, m in (("student", student), ("teacher", teacher["model"])):
        if cfg.data.img_size % m["patch_size"]:
            raise ConfigError(f"{where}.{who}: data.img_size={cfg.data.img_size} is not a multiple of "
                              f"patch_size={m['patch_size']}")
    for n in ("pretrained_ckpt", "finetuned_ckpt"):
        if teacher["train"] and teacher[n]:
            raise ConfigError(f"{where}.teacher.{n}={teacher[n]!r} (from the recipe or checkpoints.*) is given "
                              "but this row's teacher is trained by the harness (teacher.train=true), which "
                              "would ignore that file; set teacher.train=false or leave the checkpoint unset")
    if not teacher["train"]:
        needs = ["pretrained_ckpt"] if row.method == "dmae" and dis["teacher_source"] == "pretrained" else []
        if row.method == "kd" or (row.method == "dmae" and dis["teacher_source"] == "finetuned"):
            needs.append("finetuned_ckpt")
        for n in needs:
            if not teacher[n]:
                raise ConfigError(f"{where}: teacher.{n} is required when teacher.train=false (profile "
                                  f"{cfg.profile}); give the official MAE checkpoint's path")
    if row.method == "dmae":
        s_depth, t_depth = PRESETS[student["preset"]].depth, PRESETS[teacher["model"]["preset"]].depth
        for pair in dis["pairs"]:
            if len(pair) != 2:
                raise ConfigError(f"{where}.distill.pairs: {pair} is not a (student block, teacher block) pair")
            s, t = pair
            if not 0 <= s < s_depth:
                raise ConfigError(f"{where}.distill.pairs: student block {s} is beyond the student's depth "
                                  f"{s_depth} (0-based)")
            if not 0 <= t < t_depth:
                raise ConfigError(f"{where}.distill.pairs: teacher block {t} is beyond the teacher's depth "
                                  f"{t_depth} (0-based)")


def validate_claims(cfg: DictConfig) -> None:
    """Each claim names rows of the table, a known test and source, a margin, and for `greater` optionally a bound
    (finite, >= 0; a `within` claim has none: its margin already is the equivalence bound). A row removed on the
    command line (~rows.<key>) leaves its claims in place; the report shows them as not applicable."""
    known = set(cfg.rows.keys()) | _recipe_rows(cfg.table)
    seen = set()
    for i, cl in enumerate(cfg.get("claims") or []):
        where = f"table {cfg.table!r} claims[{i}] (id {cl.id!r})"
        if not cl.id or not NAME.fullmatch(cl.id) or ".." in cl.id:
            raise ConfigError(f"table {cfg.table!r} claims[{i}]: id={cl.id!r} must be a plain name ([A-Za-z0-9_.-])")
        if cl.id in seen:
            raise ConfigError(f"{where}: id used twice")
        seen.add(cl.id)
        if not cl.text:
            raise ConfigError(f"{where}: text is empty; say what the claim is")
        for side in ("a", "b"):
            if not cl[side]:
                raise ConfigError(f"{where}: {side} is empty; give one row or a group of rows")
            unknown = [r for r in cl[side] if r not in known]
            if unknown:
                raise ConfigError(f"{where}: {side} names unknown row(s) {', '.join(map(repr, unknown))}"
                                  f"{did_you_mean(unknown[0], known)}; rows of {cfg.table!r}: "
                                  f"{', '.join(sorted(known))}")
        both = sorted(set(cl.a) & set(cl.b))
        if both:
            raise ConfigError(f"{where}: row(s) {', '.join(both)} on both sides")
        if cl.test not in CLAIM_TESTS:
            raise ConfigError(f"{where}: test={cl.test!r} must be one of {', '.join(CLAIM_TESTS)}")
        if cl.margin is None or not math.isfinite(cl.margin):
            raise ConfigError(f"{where}: margin is missing; give it in top-1 points (e.g. margin: 0.0)")
        if cl.test == "within" and cl.margin <= 0:
            raise ConfigError(f"{where}: margin={cl.margin} must be > 0 for test within")
        if cl.get("bound") is not None:
            if cl.test == "within":
                raise ConfigError(f"{where}: bound={cl.bound} is for test greater only (a within claim's margin is "
                                  "its equivalence bound)")
            if not math.isfinite(cl.bound) or cl.bound < 0:
                raise ConfigError(f"{where}: bound={cl.bound} must be a finite number >= 0 (top-1 points)")
        if cl.source not in CLAIM_SOURCES:
            raise ConfigError(f"{where}: source={cl.source!r} must be one of {', '.join(CLAIM_SOURCES)} (user: "
                              "your own hypothesis, judged like the others and never set against a paper number)"
                              f"{did_you_mean(cl.source, CLAIM_SOURCES)}")
