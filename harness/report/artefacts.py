"""What a report keeps beside its Markdown for machines and for a clone (harness.report.markdown writes them into
reports/<name>/): the rows' model sizes and FLOPs, where the report was written (git commit, a dirty flag, the
package version) and summary.json.

    model_costs(specs)   per row: trainable parameters of the fine-tuned classifier and of the pre-training model
                         (encoder + decoder + projection heads), built on the meta device from the row's resolved
                         stage specs (harness.core.models); FLOPs per image of its pre-training step, fine-tuning step
                         (forward + backward) and evaluation (forward), counted by harness.bench.flops on the meta
                         device for the step the benchmark builds from those specs (harness.bench.spec.step_spec)
    writer_state()       the code writing the report: git commit, dirty flag (`git status --porcelain` lists a
                         change outside the folder being written), dmae-harness's installed version

Importing this module loads no torch: model_costs imports it when called.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from harness.core.arch import get_arch
from harness.bench.spec import step_spec
from harness.core.spec import stage_spec
from harness.core.lazy import lazy

# model sizes and FLOPs build the models (on the meta device): torch only when a report is written
torch = lazy("torch")
flops = lazy("harness.bench.flops")
models = lazy("harness.core.models")

PACKAGE = "dmae-harness"
REPO = Path(__file__).resolve().parent.parent
_COSTS: Dict[str, dict] = {}  # a spec pair's costs, by its JSON (models on the meta device are cheap, torch is not)


def _n_classes(data: Mapping) -> int:
    return 10 if data.get("name") == "fashion_mnist" else 1000  # as harness.bench.estimate costs a stage


def _row_costs(pretrain: Optional[dict], finetune: Optional[dict]) -> dict:
    def trainable(m) -> int:
        return int(sum(p.numel() for p in m.parameters() if p.requires_grad))

    def step_flops(spec, kind: str, batch: int, n_cls: int, model=None) -> float:
        st = step_spec(kind, model or spec.model, spec.data.img_size, batch, n_cls,
                       pretrain=getattr(spec, "pretrain", None), finetune=getattr(spec, "finetune", None),
                       distill=getattr(spec, "distill", None), kd=getattr(spec, "kd", None),
                       teacher=getattr(spec, "teacher_model", None))
        return float(flops.meta_flops_per_image(st))

    out: dict = {}
    if finetune:
        ft = stage_spec(finetune)
        n_cls = _n_classes(finetune.get("data", {}))
        with torch.device("meta"):
            out["params"] = trainable(models.build_classifier(get_arch(ft.model.preset), n_cls, ft.data.img_size,
                                                       ft.model.patch_size))
        out["finetune_flops_per_image"] = step_flops(ft, "finetune_kd" if ft.kd else "finetune",
                                                     ft.finetune.batch_size, n_cls)
        out["eval_flops_per_image"] = step_flops(ft, "eval", ft.finetune.eval_batch_size, n_cls)
    if pretrain:
        pt = stage_spec(pretrain)
        with torch.device("meta"):
            m = models.build_mae(get_arch(pt.model.preset), pt.data.img_size, pt.model.patch_size)
            if pt.objective == "dmae" and pt.distill is not None and pt.teacher_model is not None:
                m.add_distill_heads([get_arch(pt.teacher_model.preset).embed_dim] * len(pt.distill.pairs),
                                    pt.distill.projection)
        out["params_pretrain"] = trainable(m)
        out["pretrain_flops_per_image"] = step_flops(pt, pt.objective, pt.pretrain.batch_size,
                                                     _n_classes(pretrain.get("data", {})))
    return out


def model_costs(specs: Mapping[str, Mapping]) -> Dict[str, dict]:
    """{row: {params, params_pretrain, pretrain_flops_per_image, finetune_flops_per_image, eval_flops_per_image}}
    from {row: {"pretrain": spec dict | None, "finetune": spec dict | None}} (harness.report.collect.s
    Collected.specs); a
    key is absent where the row has no such stage. A row whose models cannot be built here gets {"error": why}."""
    out: Dict[str, dict] = {}
    for row, by_stage in specs.items():
        pre, fin = (by_stage or {}).get("pretrain"), (by_stage or {}).get("finetune")
        if not pre and not fin:
            continue
        key = json.dumps([pre, fin], sort_keys=True, default=str)
        if key not in _COSTS:
            try:
                _COSTS[key] = _row_costs(pre, fin)
            except (ImportError, RuntimeError, ValueError, TypeError, KeyError, NotImplementedError) as e:
                _COSTS[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        out[row] = dict(_COSTS[key])
    return out


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state(exclude: Sequence[Path] = (), repo: Path = REPO) -> dict:
    """{"commit": HEAD or None, "dirty": whether `git status --porcelain` lists a change (None outside a git
    checkout)}; paths in `exclude` inside the checkout (the reports folder being written) do not count."""
    def git(*args) -> Optional[str]:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    if commit is None:
        return {"commit": None, "dirty": None}
    top = Path((git("rev-parse", "--show-toplevel") or str(repo)).strip()).resolve()
    specs = []
    for p in exclude:
        try:
            specs.append(f":(exclude){Path(p).resolve().relative_to(top).as_posix() or '.'}")
        except ValueError:
            continue  # outside the checkout: git does not see it anyway
    status = git("status", "--porcelain", "--", ".", *specs) if specs else git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status.strip())}


def writer_state(exclude: Sequence[Path] = ()) -> dict:
    """Where a report is written: {"git_commit", "git_dirty", "package", "package_version"}."""
    g = git_state(exclude)
    return {"git_commit": g["commit"], "git_dirty": g["dirty"], "package": PACKAGE,
            "package_version": package_version()}


def jsonable(x):
    """A value for summary.json: NaN/inf and pandas' missing values as None, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (TypeError, ValueError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(obj, path: Path) -> Path:
    Path(path).write_text(json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)
