"""The report's sections on what the run cost and where its numbers come from: the cost per row (with the rows' model
sizes and FLOPs) and against the KD baseline, every stage with its status and cost, and the provenance (command,
commits, the key config values, hardware, the packages and code that wrote the report, when)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import time
from typing import Dict, List, Optional

import pandas as pd

from harness.core.rundir import MANIFEST_FILE
from harness.report.collect import Collected, row_costs
from harness.report.formatting import fmt, md_table, missing, si

PACKAGES = ("torch", "timm", "submitit", "pandas", "numpy", "scipy", "hydra-core", "matplotlib")


def package_versions() -> Dict[str, Optional[str]]:
    """{package: its version where this report is written, None when not installed} for PACKAGES."""
    versions: Dict[str, Optional[str]] = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    return versions


def cost_section(c: Collected, summary: pd.DataFrame, papers: Dict[str, dict]) -> List[str]:
    """The Cost section: per row, per seed and over all seeds (teacher stages apart), DMAE against the KD baseline
    where the table has both, and the rows' model sizes."""
    costs, st = row_costs(c), c.stages
    out = ["A row's cost is its pre-train + fine-tune + evaluate stages per seed (mean over finished seeds); device-"
           "hours = wall time × world size. Teacher stages, shared by every row, are listed separately.", "",
           md_table(["row", "finished seeds", "wall per seed (s)", "device-h per seed", "device-h all seeds", "note"],
                    [[r["row"], r["finished"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                      fmt(r["device_hours_total"], 4), r["note"]] for r in costs.to_dict("records")]), ""]
    teach = st[st["role"].str.startswith("teacher")]
    out += [md_table(["teacher stage", "status", "wall (s)", "device-h"],
                     [[f"`{r['stage_id']}`", r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4)]
                      for r in teach.to_dict("records")]) if len(teach) else "No teacher stages (checkpoints given).",
            ""]
    per = costs.set_index("row")["device_hours"]
    kd_rows = summary.loc[summary["method"] == "kd", "row"].tolist()
    dmae_rows = summary.loc[summary["method"] == "dmae", "row"].tolist()
    if kd_rows and dmae_rows:
        out += ["**DMAE against the KD baseline** (device-hours per seed, teacher stages excluded on both sides):", ""]
        for row in dmae_rows:
            for kd_row in kd_rows:
                ours, kd = per.get(row), per.get(kd_row)
                out.append(f"- `{row}` vs `{kd_row}`: " + (
                    f"{fmt(ours, 4)} vs {fmt(kd, 4)} → {100 * (ours - kd) / kd:+.1f}%"
                    if not (missing(ours) or missing(kd) or kd == 0) else "not enough data"))
        cost = [p for p in papers.values() if p["table"] == "training_cost_ICLR_version"]
        out += [""] + [f"- paper ({p['masking_ratio']} masking): {p['metric']} = {p['text']} — {p['source']}"
                       for p in cost]
        out += ["", "A row's cost includes its own pre-training: DMAE's pays the teacher's forward pass, the KD row's "
                "fine-tuning pays it every step. On a CPU profile (one thread per stage, tiny models, no data-loading "
                "workers) these ratios say little about the paper's 8-GPU ImageNet claim."]
    return out + _model_sizes(c, summary)


def _model_sizes(c: Collected, summary: pd.DataFrame) -> List[str]:
    """Parameters and FLOPs per image of each row's models (harness.report.artefacts.model_costs, kept in run.json)."""
    if not c.models:
        return []
    rows = []
    for r in summary.to_dict("records"):
        m = c.models.get(r["row"], {})
        count = lambda k: "—" if missing(m.get(k)) else f"{int(m[k]):,}"  # noqa: E731
        rows.append([f"`{r['row']}`", count("params"), count("params_pretrain"),
                     si(m.get("pretrain_flops_per_image"), "FLOP"), si(m.get("finetune_flops_per_image"), "FLOP"),
                     si(m.get("eval_flops_per_image"), "FLOP"), m.get("error", "")])
    return ["", "Model size and compute per image, from each row's resolved stage specs (harness/report/artefacts.py): "
            "trainable parameters of the models built on the meta device; FLOPs per image counted by "
            "harness/bench/flops.py for the step the benchmark builds from the same specs (forward + backward for a "
            "training step, forward for the evaluation). A DMAE pre-training step includes the teacher's forward up to "
            "its aligned block; a KD fine-tuning step the teacher's forward (on CPU at 28 px the harness looks its "
            "logits up instead).", "",
            md_table(["row", "parameters: fine-tuned classifier", "parameters: pre-training model (encoder, decoder, "
                      "projection heads)", "pre-training step", "fine-tuning step", "evaluation", "note"], rows)]


def stages_section(c: Collected) -> List[str]:
    """The Stages section: every stage of the plan with its status, cost, device and reason."""
    rows = []
    for r in c.stages.to_dict("records"):
        rows.append([f"`{r['stage_id']}`", r["role"], r["status"], fmt(r["wall_s"], 1), fmt(r["device_hours"], 4),
                     fmt(r["images_per_s"], 0), r["device_name"] if isinstance(r["device_name"], str) else "—",
                     (r["reason"] or "")[:200]])
    return [f"Each stage's merged spec is <stage>/config.json under {c.results} (results/ is not committed, "
            "so nothing there is linked).", "",
            md_table(["stage", "role", "status", "wall (s)", "device-h", "images/s", "device", "reason"], rows)]


def provenance_section(c: Collected, writer: dict) -> List[str]:
    """The Provenance section; `writer`: harness.report.artefacts.writer_state of the code writing the report."""
    m, cfg, st = c.manifest, c.manifest.get("config", {}), c.stages
    commits = st["git_commit"].dropna().value_counts().sort_index()
    dirty = st.loc[st["git_dirty"].map(lambda v: v is True or str(v) == "True"), "stage_id"] \
        if "git_dirty" in st else pd.Series(dtype=object)
    key = {"profile": cfg.get("profile"), "data": cfg.get("data"), "teacher": {k: v for k, v in cfg.get(
        "teacher", {}).items() if k in ("model", "train", "pretrained_ckpt", "finetuned_ckpt")},
           "student": cfg.get("student"), "pretrain": cfg.get("pretrain"), "distill": cfg.get("distill"),
           "finetune": cfg.get("finetune"), "kd": cfg.get("kd"), "seed": cfg.get("seed"), "seeds": cfg.get("seeds"),
           "launcher": (cfg.get("launcher") or {}).get("name"), "run": cfg.get("run")}
    hw = st[st["status"] == "done"].fillna({"device_name": "?", "host": "?"}).groupby(
        ["device", "device_name", "world_size", "host"], dropna=False)["device_hours"].agg(["count", "sum"])
    versions = [f"{p} {v}" if v is not None else f"{p} (not installed)" for p, v in package_versions().items()]
    fin = st["finished_at"].dropna()
    out = [f"- Command: `{m.get('command') or '(not recorded: run from Python)'}`",
           f"- Overrides: `{' '.join(m.get('overrides', [])) or '(none)'}`",
           f"- Git commit at launch: `{m.get('git_commit')}`; in stage results: "
           + (", ".join(f"`{k}` ({v} stages)" for k, v in commits.items()) or "none")
           + (f"; {len(dirty)} stage(s) computed from a working tree with uncommitted changes" if len(dirty) else ""),
           f"- Resolved config: {c.results}/config.yaml and {c.results}/{MANIFEST_FILE} "
           "(not linked: results/ is not committed), so the key values are embedded here:", "", "```"]
    out += [f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in key.items()] + ["```", ""]
    out.append("- Hardware (finished stages): " + ("; ".join(
        f"{d} {n} ×{int(w) if w == w else '?'} on {h}: {int(r['count'])} stages, {r['sum']:.4f} device-h"
        for (d, n, w, h), r in hw.iterrows()) or "none"))
    out.append("- Runs used torch " + ", ".join(sorted(st["torch"].dropna().unique())) + ", python "
               + ", ".join(sorted(st["python"].dropna().unique())))
    out.append("- Packages where this report was written: " + ", ".join(versions))
    out.append(f"- Written by {writer['package']} {writer['package_version']}, code at commit "
               f"`{writer['git_commit'] or 'unknown (not a git checkout)'}`" + (
                   "" if writer["git_dirty"] is None else
                   " with uncommitted changes (`git status --porcelain` lists files outside the reports folder)"
                   if writer["git_dirty"] else ", working tree clean"))
    out.append(f"- Stages finished between {fin.min() if len(fin) else '—'} and {fin.max() if len(fin) else '—'}")
    out.append(f"- Report generated: {generated_at()}")
    return out


def generated_at() -> str:
    """Now, or SOURCE_DATE_EPOCH (seconds, UTC) when set: a reproducible build of the report."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch.isdigit():
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(epoch)))
    return time.strftime("%Y-%m-%d %H:%M:%S")
