"""What a benchmarked step is (StepSpec, also the key harness.bench.estimate maps plan stages to) and the steps and
input
pipelines of a profile, read from the table2 recipe at that profile. Standard library, hydra and omegaconf only:
harness.bench.estimate imports it for --dry-run without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from harness.core.arch import get_arch, num_visible
from harness.plan.config import ConfigError, load_config
from harness.plan.resolve import resolve_pairs
from harness.core.spec import DistillSpec, FinetuneSpec, KDConfig, ModelConfig, PretrainSpec

TRAIN_KINDS = ("mae", "dmae", "finetune", "finetune_kd")
QUICK_SHAPES = ("tiny", "smoke")
ALL_SHAPES = ("tiny", "smoke", "paper")


@dataclass(frozen=True)
class StepSpec:
    """One measured step: what runs and at which shape. Also the key harness.bench.estimate maps plan stages to."""

    kind: str  # mae | dmae | finetune | finetune_kd | eval
    model: str  # preset of harness.core.models.PRESETS (the trained / evaluated model)
    patch_size: int
    img_size: int
    batch: int
    mask_ratio: float = 0.0  # mae / dmae
    visible_rounding: str = "paper"
    teacher: str = ""  # dmae: the MAE teacher; finetune_kd: the fine-tuned teacher classifier
    teacher_patch: int = 0
    teacher_mode: str = ""  # dmae: partial | full
    pairs: Tuple[Tuple[int, int], ...] = ()  # dmae: (student block, teacher block)
    num_classes: int = 10
    drop_path: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    # the optimizer and loss settings of the profile's stages (harness.core.build makes both from them); the defaults,
    # for specs from elsewhere (the estimator), are the config's
    weight_decay: float = PretrainSpec.weight_decay  # profile_steps sets each kind's own
    layer_decay: float = FinetuneSpec.layer_decay  # fine-tuning kinds
    betas: Tuple[float, ...] = ()  # () = the config's default of the kind
    distill: Tuple[Tuple[str, object], ...] = ()  # dmae: alpha, pixel_weight, distance, normalize, include_cls, ...
    kd: Tuple[object, ...] = (KDConfig.kind, KDConfig.weight, KDConfig.temperature)  # finetune_kd
    norm_pix_loss: bool = PretrainSpec.norm_pix_loss  # mae / dmae

    @property
    def trains(self) -> bool:
        return self.kind in TRAIN_KINDS

    def visible(self) -> int:
        n = (self.img_size // self.patch_size) ** 2
        return num_visible(n, self.mask_ratio, self.visible_rounding) if self.kind in ("mae", "dmae") else n

    def teacher_blocks_run(self) -> int:
        """Teacher encoder blocks a step runs (0 without a teacher)."""
        if self.kind == "dmae":
            return get_arch(self.teacher).depth if self.teacher_mode == "full" else max(t for _, t in self.pairs) + 1
        if self.kind == "finetune_kd":
            return get_arch(self.teacher).depth
        return 0

    @property
    def projection(self) -> str:
        """dmae: the student-to-teacher projection heads (linear | mlp); '' for the other kinds."""
        return str(dict(self.distill).get("projection", DistillSpec.projection)) if self.kind == "dmae" else ""

    def match_key(self) -> tuple:
        """What must agree for a measured per-image cost to apply as it is (batch and regularisers aside): the
        models and shapes, and for DMAE the teacher blocks run and the projection heads (one per aligned pair; an
        MLP head costs more than a linear one). The loss settings (distance, alpha, norm_pix_loss, KD kind, ...)
        change elementwise terms only."""
        dmae = self.kind == "dmae"
        return (self.kind, self.model, self.patch_size, self.img_size, self.visible(), self.teacher,
                self.teacher_patch, self.teacher_mode if dmae else "", self.teacher_blocks_run(),
                self.projection, len(self.pairs) if dmae else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "StepSpec":
        d = dict(d)
        d["pairs"] = tuple(tuple(int(x) for x in p) for p in d.get("pairs", ()))
        d["betas"] = tuple(d.get("betas", ()))
        d["distill"] = tuple(tuple(kv) for kv in d.get("distill", ()))
        d["kd"] = tuple(d.get("kd", cls.kd))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# the distill settings a DMAE step carries (StepSpec.distill), as harness.core.build and the stages read them
DISTILL_FIELDS = ("alpha", "pixel_weight", "distance", "normalize", "include_cls", "projection")


def step_spec(kind: str, model: ModelConfig, img_size: int, batch: int, num_classes: int, *,
              pretrain: Optional[PretrainSpec] = None, finetune: Optional[FinetuneSpec] = None,
              distill: Optional[DistillSpec] = None, kd: Optional[KDConfig] = None,
              teacher: Optional[ModelConfig] = None) -> StepSpec:
    """The step of `kind` that a stage with these spec sections runs, with every setting of them the step depends
    on (what harness.core.build and the stages make its models, objective and optimizer from). The benchmark's profile
    steps and harness.bench.estimate's stage steps both come from here, so the two cannot drift apart.

    model, teacher: the stage's models; pretrain (mae, dmae), distill (dmae: pairs resolved), finetune (finetune,
    finetune_kd) and kd (finetune_kd): the stage spec's sections of those names (harness.core.spec)."""
    if kind not in TRAIN_KINDS + ("eval",):
        raise ValueError(f"step kind must be one of {TRAIN_KINDS + ('eval',)}, got {kind!r}")
    base = dict(model=model.preset, patch_size=model.patch_size, img_size=int(img_size), batch=int(batch),
                num_classes=int(num_classes))
    if kind in ("mae", "dmae"):
        p = pretrain
        base.update(mask_ratio=p.mask_ratio, visible_rounding=p.visible_rounding, weight_decay=p.weight_decay,
                    betas=tuple(p.betas), norm_pix_loss=p.norm_pix_loss)
        if kind == "dmae":
            base.update(teacher=teacher.preset, teacher_patch=teacher.patch_size, teacher_mode=distill.teacher_mode,
                        pairs=tuple(tuple(pr) for pr in distill.pairs),
                        distill=tuple((k, getattr(distill, k)) for k in DISTILL_FIELDS))
    elif kind in ("finetune", "finetune_kd"):
        f = finetune
        base.update(drop_path=f.drop_path, mixup=f.mixup, cutmix=f.cutmix, smoothing=f.smoothing,
                    weight_decay=f.weight_decay, layer_decay=f.layer_decay, betas=tuple(f.betas))
        if kind == "finetune_kd":
            base.update(teacher=teacher.preset, teacher_patch=teacher.patch_size,
                        kd=(kd.kind, kd.weight, kd.temperature))
    return StepSpec(kind, **base)


def _section(cls, d: dict):
    """A stage spec section (harness.core.spec) from the table config's section of that name, less its config-only keys
    (effective_batch, epoch_scale, align, teacher_source: resolved away before a stage sees them)."""
    return cls(**{f.name: d[f.name] for f in fields(cls)})


def _mask_tag(r: float) -> str:
    return f"m{round(r * 100)}"


def profile_cfg(profile: str) -> dict:
    """The table2 recipe at a profile, as a plain dict. The paper profile's mandatory paths (dataset, official
    checkpoints) only matter to a real run: placeholders stand in for them here."""
    try:
        cfg = load_config("table2", [f"profile={profile}"])
    except ConfigError:
        cfg = load_config("table2", [f"profile={profile}", "data.root=/not-used-by-bench",
                                     "teacher.pretrained_ckpt=/not-used-by-bench",
                                     "teacher.finetuned_ckpt=/not-used-by-bench"])
    return OmegaConf.to_container(cfg, resolve=True)


def profile_steps(profile: str, batch: Optional[int] = None, device_type: str = "cpu",
                  batch_cap: Optional[int] = None) -> List[Tuple[str, StepSpec]]:
    """The labelled steps of a profile's shapes (recipes/profile/<profile>.yaml through the table2 recipe).

    batch: one batch size for every step (default: the profile's batch sizes; on CPU the paper shapes use 4);
    batch_cap: at most this batch size."""
    c = profile_cfg(profile)
    img = int(c["data"]["img_size"])
    n_cls = 1000 if c["data"]["name"] == "imagefolder" else 10
    if batch is None and device_type != "cuda" and img >= 128:
        batch = 4  # ViT-L/ViT-B at 224x224 on a CPU: a small batch keeps the run to minutes

    def bs(profile_batch) -> int:
        return batch or min(int(profile_batch), batch_cap or int(profile_batch))
    te = c["teacher"]
    st, tm = _section(ModelConfig, c["student"]), _section(ModelConfig, te["model"])
    pre, fin, kd = _section(PretrainSpec, c["pretrain"]), _section(FinetuneSpec, c["finetune"]), \
        _section(KDConfig, c["kd"])
    dis = _section(DistillSpec, dict(c["distill"], teacher_mode="partial", pairs=resolve_pairs(
        c["distill"], get_arch(st.preset).depth, get_arch(tm.preset).depth)))
    masks = sorted({pre.mask_ratio} | {float(r.get("pretrain", {}).get("mask_ratio", pre.mask_ratio))
                                       for r in c["rows"].values() if r.get("method") == "dmae"})

    def step(kind: str, model: ModelConfig, profile_batch, **sections) -> StepSpec:
        return step_spec(kind, model, img, bs(profile_batch), n_cls, **sections)
    mae = step("mae", st, pre.batch_size, pretrain=pre)
    dmae = step("dmae", st, pre.batch_size, pretrain=pre, distill=dis, teacher=tm)
    steps = [(f"mae_{_mask_tag(mae.mask_ratio)}", mae),
             (f"dmae_partial_{_mask_tag(mae.mask_ratio)}", dmae),
             (f"dmae_full_{_mask_tag(mae.mask_ratio)}", replace(dmae, teacher_mode="full"))]
    steps += [(f"dmae_partial_{_mask_tag(m)}", replace(dmae, mask_ratio=m)) for m in masks if m != mae.mask_ratio]
    steps += [("finetune", step("finetune", st, fin.batch_size, finetune=fin)),
              ("finetune_kd", step("finetune_kd", st, fin.batch_size, finetune=fin, kd=kd, teacher=tm)),
              ("eval", step("eval", st, fin.eval_batch_size))]
    if te.get("train", True):  # the profile pre-trains and fine-tunes its teacher: measure those steps too
        tp, tf = _section(PretrainSpec, te["pretrain"]), _section(FinetuneSpec, te["finetune"])
        tmae = step("mae", tm, tp.batch_size, pretrain=tp)
        steps += [(f"teacher_mae_{_mask_tag(tmae.mask_ratio)}", tmae),
                  ("teacher_finetune", step("finetune", tm, tf.batch_size, finetune=tf)),
                  ("teacher_eval", step("eval", tm, tf.eval_batch_size))]
    return steps


def profile_data(profile: str) -> List[dict]:
    """The input pipelines a profile's stages use: (transform, img_size, randaug, reprob)."""
    c = profile_cfg(profile)
    img, fin = int(c["data"]["img_size"]), c["finetune"]
    out = [dict(transform="pretrain", img_size=img, randaug="", reprob=0.0, batch=int(c["pretrain"]["batch_size"])),
           dict(transform="finetune", img_size=img, randaug=fin["randaug"] or "", reprob=float(fin["reprob"]),
                batch=int(fin["batch_size"])),
           dict(transform="eval", img_size=img, randaug="", reprob=0.0, crop_pct=float(c["data"]["eval_crop_pct"]),
                batch=int(fin["eval_batch_size"]))]
    tf = c["teacher"].get("finetune", {})
    if c["teacher"].get("train", True) and ((tf.get("randaug") or "") != (fin["randaug"] or "")
                                           or float(tf.get("reprob", 0)) != float(fin["reprob"])):
        out.append(dict(transform="finetune", img_size=img, randaug=tf.get("randaug") or "",
                        reprob=float(tf.get("reprob", 0.0)), batch=int(tf["batch_size"])))
    return out
