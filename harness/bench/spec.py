"""What a benchmarked step is (StepSpec, also the key harness.estimate maps plan stages to) and the steps and input
pipelines of a profile, read from the table2 recipe at that profile. Standard library, hydra and omegaconf only:
harness.estimate imports it for --dry-run without importing torch."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from ..arch import get_arch
from ..config import ConfigError, FinetuneConfig, KDConfig, PretrainConfig, load_config, resolve_pairs

TRAIN_KINDS = ("mae", "dmae", "finetune", "finetune_kd")
QUICK_SHAPES = ("tiny", "smoke")
ALL_SHAPES = ("tiny", "smoke", "paper")


@dataclass(frozen=True)
class StepSpec:
    """One measured step: what runs and at which shape. Also the key harness.estimate maps plan stages to."""

    kind: str  # mae | dmae | finetune | finetune_kd | eval
    model: str  # preset of harness.models.PRESETS (the trained / evaluated model)
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
    # the optimizer and loss settings of the profile's stages (harness.build makes both from them); the defaults,
    # for specs from elsewhere (the estimator), are the config's
    weight_decay: float = PretrainConfig.weight_decay  # profile_steps sets each kind's own
    layer_decay: float = FinetuneConfig.layer_decay  # fine-tuning kinds
    betas: Tuple[float, ...] = ()  # () = the config's default of the kind
    distill: Tuple[Tuple[str, object], ...] = ()  # dmae: alpha, pixel_weight, distance, normalize, include_cls, ...
    kd: Tuple[object, ...] = (KDConfig.kind, KDConfig.weight, KDConfig.temperature)  # finetune_kd
    norm_pix_loss: bool = PretrainConfig.norm_pix_loss  # mae / dmae

    @property
    def trains(self) -> bool:
        return self.kind in TRAIN_KINDS

    def visible(self) -> int:
        from ..models import num_visible  # harness.models imports torch; this module stays free of it
        n = (self.img_size // self.patch_size) ** 2
        return num_visible(n, self.mask_ratio, self.visible_rounding) if self.kind in ("mae", "dmae") else n

    def teacher_blocks_run(self) -> int:
        """Teacher encoder blocks a step runs (0 without a teacher)."""
        if self.kind == "dmae":
            return get_arch(self.teacher).depth if self.teacher_mode == "full" else max(t for _, t in self.pairs) + 1
        if self.kind == "finetune_kd":
            return get_arch(self.teacher).depth
        return 0

    def match_key(self) -> tuple:
        """What must agree for a measured per-image cost to apply as it is (batch and regularisers aside)."""
        return (self.kind, self.model, self.patch_size, self.img_size, self.visible(), self.teacher,
                self.teacher_patch, self.teacher_mode if self.kind == "dmae" else "", self.teacher_blocks_run())

    @classmethod
    def from_dict(cls, d: dict) -> "StepSpec":
        d = dict(d)
        d["pairs"] = tuple(tuple(int(x) for x in p) for p in d.get("pairs", ()))
        d["betas"] = tuple(d.get("betas", ()))
        d["distill"] = tuple(tuple(kv) for kv in d.get("distill", ()))
        d["kd"] = tuple(d.get("kd", cls.kd))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


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
    st, te = c["student"], c["teacher"]
    pre, fin, dis = c["pretrain"], c["finetune"], c["distill"]
    pairs = tuple(tuple(int(x) for x in p)
                  for p in resolve_pairs(dis, get_arch(st["preset"]).depth, get_arch(te["model"]["preset"]).depth))
    masks = sorted({float(pre["mask_ratio"])} | {float(r.get("pretrain", {}).get("mask_ratio", pre["mask_ratio"]))
                                                 for r in c["rows"].values() if r.get("method") == "dmae"})
    base = dict(patch_size=int(st["patch_size"]), img_size=img, num_classes=n_cls)
    distill = tuple((k, dis[k]) for k in ("alpha", "pixel_weight", "distance", "normalize", "include_cls",
                                          "projection"))
    mae = StepSpec("mae", st["preset"], batch=bs(pre["batch_size"]), mask_ratio=float(pre["mask_ratio"]),
                   visible_rounding=pre.get("visible_rounding", "paper"), weight_decay=float(pre["weight_decay"]),
                   betas=tuple(float(b) for b in pre["betas"]), norm_pix_loss=bool(pre["norm_pix_loss"]), **base)
    dmae = replace(mae, kind="dmae", teacher=te["model"]["preset"], teacher_patch=int(te["model"]["patch_size"]),
                   teacher_mode="partial", pairs=pairs, distill=distill)
    kd = c["kd"]
    ft = StepSpec("finetune", st["preset"], batch=bs(fin["batch_size"]), drop_path=float(fin["drop_path"]),
                  mixup=float(fin["mixup"]), cutmix=float(fin["cutmix"]), smoothing=float(fin["smoothing"]),
                  weight_decay=float(fin["weight_decay"]), layer_decay=float(fin["layer_decay"]),
                  betas=tuple(float(b) for b in fin["betas"]),
                  kd=(kd["kind"], float(kd["weight"]), float(kd["temperature"])), **base)
    steps = [(f"mae_{_mask_tag(mae.mask_ratio)}", mae),
             (f"dmae_partial_{_mask_tag(mae.mask_ratio)}", dmae),
             (f"dmae_full_{_mask_tag(mae.mask_ratio)}", replace(dmae, teacher_mode="full"))]
    steps += [(f"dmae_partial_{_mask_tag(m)}", replace(dmae, mask_ratio=m)) for m in masks if m != mae.mask_ratio]
    steps += [("finetune", ft),
              ("finetune_kd", replace(ft, kind="finetune_kd", teacher=te["model"]["preset"],
                                      teacher_patch=int(te["model"]["patch_size"]))),
              ("eval", StepSpec("eval", st["preset"], batch=bs(fin["eval_batch_size"]), **base))]
    if te.get("train", True):  # the profile pre-trains and fine-tunes its teacher: measure those steps too
        tp, tf = te["pretrain"], te["finetune"]
        tbase = dict(base, patch_size=int(te["model"]["patch_size"]))
        steps += [(f"teacher_mae_{_mask_tag(float(tp['mask_ratio']))}",
                   StepSpec("mae", te["model"]["preset"], batch=bs(tp["batch_size"]),
                            mask_ratio=float(tp["mask_ratio"]), visible_rounding=tp.get("visible_rounding", "paper"),
                            weight_decay=float(tp["weight_decay"]), betas=tuple(float(b) for b in tp["betas"]),
                            norm_pix_loss=bool(tp["norm_pix_loss"]), **tbase)),
                  ("teacher_finetune",
                   StepSpec("finetune", te["model"]["preset"], batch=bs(tf["batch_size"]),
                            drop_path=float(tf["drop_path"]), mixup=float(tf["mixup"]), cutmix=float(tf["cutmix"]),
                            smoothing=float(tf["smoothing"]), weight_decay=float(tf["weight_decay"]),
                            layer_decay=float(tf["layer_decay"]), betas=tuple(float(b) for b in tf["betas"]),
                            **tbase)),
                  ("teacher_eval", StepSpec("eval", te["model"]["preset"], batch=bs(tf["eval_batch_size"]),
                                            **tbase))]
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
