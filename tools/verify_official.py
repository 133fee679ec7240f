"""Side-by-side check of this harness against a checkout of the official DMAE code (github.com/UCSC-VLAA/DMAE).

    python -m tools.verify_official /path/to/DMAE                 # small shapes, seconds
    python -m tools.verify_official /path/to/DMAE --paper-shapes  # ViT-L/16 teacher -> ViT-B/16 student, 224 px
    python -m tools.verify_official /path/to/DMAE --golden        # print the official values as Python literals

Both implementations get the same seeded weights, images and mask (the mask comes from the same torch RNG state, with
the official int() count of visible patches), and the script prints, official beside harness: the MAE pixel loss and
the DMAE losses (75% and 95% masking, one and two aligned pairs), the aligned feature maps (max |delta|), the
parameter groups (weight decay and lr scale of every parameter, pre-training and fine-tuning) and the lr at every
iteration of a short schedule with gradient accumulation that does not divide the epoch -- the official side of that
schedule is the official engine's own loop (engine_distill.train_one_epoch) driven with stub models. It ends with one
PASS/FAIL line; exit code 0 (PASS), 1 (FAIL) or 2 (PATH missing or not a DMAE checkout).

The official code is never vendored: it is imported from PATH. Its age is bridged at import time, without editing or
copying it: `torch._six` (gone from torch) is provided, `np.float` (gone from numpy) is set to float while it runs,
timm's current Block is given the `qk_scale=None` argument of timm 0.3.2, and timm 0.3.2's
`optim_factory.add_weight_decay` rule (1-D parameters and biases undecayed) is restated here because main_distill.py
calls it and current timm no longer has it. Both sides therefore run the same timm Block/PatchEmbed/Mlp code: this
checks the DMAE/MAE plumbing (masking, position embeddings, feature taps, projection, losses, parameter groups, lr),
not timm 0.3.2's attention arithmetic.
"""
from __future__ import annotations

import argparse
import collections.abc
import contextlib
import importlib
import io
import math
import subprocess
import sys
import tempfile
import types
import warnings
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import timm.models.vision_transformer as tvit
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from harness.core.models import PRESETS, Arch, build_classifier, build_mae, num_visible, sincos_pos_embed_2d
from harness.core.objectives import DMAEObjective, MAEObjective
from harness.core.spec import Schedule
from harness.core.runtime import Runtime
from harness.core.train import fit

OFFICIAL_MODULES = ("models_mae_distill", "models_vit", "engine_distill", "util", "util.misc", "util.lr_sched",
                    "util.pos_embed", "util.lr_decay")
REQUIRED_FILES = ("models_mae_distill.py", "models_vit.py", "engine_distill.py", "util/lr_sched.py",
                  "util/pos_embed.py", "util/lr_decay.py", "util/misc.py")

# tolerances: both sides run the same timm layers in fp32, so differences are rounding only
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
FEAT_ATOL = 1e-4
LR_RTOL = 1e-12


@dataclass(frozen=True)
class Shapes:
    name: str
    img: int
    patch: int
    student: Arch
    teacher: Arch
    pairs: Sequence[Sequence[Sequence[int]]]  # one-pair and two-pair settings
    batch: int = 2
    classes: int = 10


SMALL = Shapes("small", img=32, patch=4,  # 64 patches: 75% -> 16 visible, 95% -> int(3.2) = round(3.2) = 3
               student=Arch(64, 4, 4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
               teacher=Arch(96, 6, 4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
               pairs=([[2, 4]], [[1, 2], [3, 5]]))
PAPER = Shapes("paper", img=224, patch=16, student=PRESETS["vit_base"], teacher=PRESETS["vit_large"],
               pairs=([[8, 17]], [[5, 11], [8, 17]]), classes=1000)
MASK_RATIOS = (0.75, 0.95)
IMAGE_SEED, WEIGHT_SEED, MASK_SEED = 1, 2, 3
# the short schedule: 10 steps per epoch, accumulation 4 (does not divide it), 3 epochs, 1 warm-up epoch
LR_SCHEDULE = dict(epochs=3, warmup_epochs=1, steps_per_epoch=10, accum_iter=4, batch_size=2, blr=0.0768,
                   min_lr=1e-6)


class CheckoutError(Exception):
    """PATH is missing or is not a checkout of the official DMAE code."""


# ---------------------------------------------------------------------------------------------------------------
# importing the official code with its age bridged


def _add_weight_decay_0_3_2(model: nn.Module, weight_decay: float = 1e-5, skip_list=()):
    """timm 0.3.2 optim_factory.add_weight_decay, as main_distill.py calls it: trainable parameters that are 1-D, or
    named *.bias, or in skip_list get no weight decay; [no-decay group, decay group]."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _import_official(path: Path, notes: List[str]):
    try:
        return types.SimpleNamespace(
            mae=importlib.import_module("models_mae_distill"),
            vit=importlib.import_module("models_vit"),
            engine=importlib.import_module("engine_distill"),
            lr_sched=importlib.import_module("util.lr_sched"),
            lr_decay=importlib.import_module("util.lr_decay"),
            misc=importlib.import_module("util.misc"),
            add_weight_decay=_add_weight_decay_0_3_2, notes=notes, path=path)
    except Exception as e:  # an import error means PATH is not code this script can adapt
        raise CheckoutError(f"could not import the official code from {path}: {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def official_code(path: Path):
    """Import the official modules from `path` with the shims in place; yields a namespace of them. The shims stay
    while the block runs (np.float is read when the official models are built) and are removed afterwards."""
    path = Path(path).resolve()
    check_checkout(path)
    notes: List[str] = []
    saved_modules = {k: sys.modules.pop(k) for k in list(sys.modules)
                     if k in OFFICIAL_MODULES or k.startswith("util.")}
    orig_block = tvit.Block
    added_np_float = False
    added_six = False

    class Block032(orig_block):
        """timm Block accepting timm 0.3.2's arguments (qk_scale=None: the default 1/sqrt(head dim); drop)."""

        def __init__(self, *args, qk_scale=None, drop=None, **kwargs):
            if qk_scale is not None:
                raise NotImplementedError("qk_scale other than None is not supported by current timm")
            if drop is not None:
                kwargs["proj_drop"] = drop
            super().__init__(*args, **kwargs)

    try:
        try:
            importlib.import_module("torch._six")
        except ImportError:
            six = types.ModuleType("torch._six")
            six.inf, six.nan = math.inf, math.nan
            six.string_classes = (str, bytes)
            six.int_classes = int
            six.container_abcs = collections.abc
            sys.modules["torch._six"] = six
            added_six = True
            notes.append("torch._six provided (inf, string_classes, container_abcs)")
        if "float" not in np.__dict__:
            np.float = float  # type: ignore[attr-defined]
            added_np_float = True
            notes.append("np.float = float while the official code runs")
        tvit.Block = Block032
        notes.append(f"timm {importlib.import_module('timm').__version__} Block given timm 0.3.2's qk_scale=None")
        sys.path.insert(0, str(path))
        try:
            mods = _import_official(path, notes)
        finally:
            sys.path.remove(str(path))
            tvit.Block = orig_block  # the official modules keep the subclass they bound
        for m in (mods.mae, mods.vit, mods.engine, mods.lr_sched):
            if not Path(m.__file__).resolve().is_relative_to(path):
                raise CheckoutError(f"{m.__name__} was imported from {m.__file__}, not from {path}")
        notes.append("timm 0.3.2 optim_factory.add_weight_decay restated (main_distill.py's pre-training groups)")
        yield mods
    finally:
        tvit.Block = orig_block
        if added_np_float:
            del np.float
        if added_six:
            sys.modules.pop("torch._six", None)
        for k in [k for k in sys.modules if k in OFFICIAL_MODULES or k.startswith("util.")]:
            sys.modules.pop(k)
        sys.modules.update(saved_modules)


def check_checkout(path: Path) -> None:
    if not path.is_dir():
        raise CheckoutError(f"{path}: no such directory (give the path of a checkout of github.com/UCSC-VLAA/DMAE)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckoutError(f"{path} is not a checkout of the official DMAE code: missing {', '.join(missing)}")


def official_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


# ---------------------------------------------------------------------------------------------------------------
# seeded weights and inputs, shared by both sides (and by tests/test_fidelity.py's golden values)


def seeded_state(model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """Deterministic weights for every entry of `model`'s state dict, by name (independent of the model's own init
    code): LayerNorm weights 1 + 0.1 n, other tensors with 2+ dims n / sqrt(fan in), the rest 0.02 n."""
    norms = {f"{m_name}.weight" for m_name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    out = {}
    for name, t in model.state_dict().items():
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63)
        n = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name in norms:
            v = 1.0 + 0.1 * n
        elif t.dim() >= 2 and name not in ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token"):
            v = n / math.sqrt(t[0].numel())
        else:
            v = 0.02 * n
        out[name] = v.to(t.dtype)
    return out


def seeded_images(shapes: Shapes, seed: int = IMAGE_SEED) -> torch.Tensor:
    return torch.randn(shapes.batch, 3, shapes.img, shapes.img, generator=torch.Generator().manual_seed(seed))


def harness_models(shapes: Shapes, pairs):
    """The harness side: student MAE with one linear projection per pair, teacher MAE with decoder (seeded)."""
    teacher = build_mae(shapes.teacher, shapes.img, shapes.patch)
    teacher.load_state_dict(seeded_state(teacher, WEIGHT_SEED + 1))
    student = build_mae(shapes.student, shapes.img, shapes.patch)
    student.add_distill_heads([shapes.teacher.embed_dim] * len(pairs))
    student.load_state_dict(seeded_state(student, WEIGHT_SEED))
    return teacher.eval(), student


def harness_classifier(shapes: Shapes):
    clf = build_classifier(shapes.student, shapes.classes, shapes.img, shapes.patch)
    clf.load_state_dict(seeded_state(clf, WEIGHT_SEED + 2))
    return clf.eval()


def _to_official_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k.replace("distill_proj.", "aligned_feature_projection_heads."): v for k, v in sd.items()}


def _to_harness_name(name: str) -> str:
    return name.replace("aligned_feature_projection_heads.", "distill_proj.")


def official_models(off, shapes: Shapes, pairs, h_teacher, h_student):
    """The official side, built by the official constructors (the paper presets by their official names), loaded with
    the harness side's weights (strict)."""
    s_idx, t_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    common = dict(norm_pix_loss=False, img_size=shapes.img, embedding_distillation_func="L1")
    student_kw = dict(common, aligned_blks_indices=s_idx, student_reconstruction_target="original_img",
                      aligned_feature_projection_mode="fc-1layer",
                      aligned_feature_projection_dim=[shapes.student.embed_dim, shapes.teacher.embed_dim])
    if shapes.name == "paper":
        teacher = off.mae.mae_vit_large_patch16_dec512d8b(**common, aligned_blks_indices=t_idx)
        student = off.mae.mae_vit_base_patch16_dec512d8b(**student_kw)
    else:
        def build(arch, **kw):
            return off.mae.MaskedAutoencoderViT(
                patch_size=shapes.patch, embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                decoder_embed_dim=arch.decoder_embed_dim, decoder_depth=arch.decoder_depth,
                decoder_num_heads=arch.decoder_num_heads, mlp_ratio=arch.mlp_ratio,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
        teacher = build(shapes.teacher, **common, aligned_blks_indices=t_idx)
        student = build(shapes.student, **student_kw)
    pos = {}  # before loading: the official init's sin-cos tables against the harness's
    grid = shapes.img // shapes.patch
    for who, m in (("student", student), ("teacher", teacher)):
        for k in ("pos_embed", "decoder_pos_embed"):
            ref = sincos_pos_embed_2d(m.state_dict()[k].shape[-1], grid)[None]
            pos[f"{who} {k}"] = (m.state_dict()[k] - ref).abs().max().item()
    teacher.load_state_dict(_to_official_keys(h_teacher.state_dict()), strict=True)
    student.load_state_dict(_to_official_keys(h_student.state_dict()), strict=True)
    return teacher.eval(), student, pos


def official_classifier(off, shapes: Shapes, h_clf):
    if shapes.name == "paper":
        clf = off.vit.vit_base_patch16(global_pool=True, num_classes=shapes.classes)
    else:
        a = shapes.student
        clf = off.vit.VisionTransformer(global_pool=True, img_size=shapes.img, patch_size=shapes.patch,
                                        embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
                                        mlp_ratio=a.mlp_ratio, qkv_bias=True,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=shapes.classes)
    clf.load_state_dict(h_clf.state_dict(), strict=True)
    return clf.eval()


# ---------------------------------------------------------------------------------------------------------------
# the computations, one side each


def official_losses(off_teacher, off_student, imgs, ratio):
    """As engine_distill.train_one_epoch: teacher encoder (draws the mask) + decoder, student forward, then
    loss += each aligned block's distillation loss. MAE: the student's own MAE path (forward_encoder draws the mask)."""
    with torch.no_grad():
        torch.manual_seed(MASK_SEED)
        lat_t, mask, ids_restore, ids_keep = off_teacher.forward_encoder_customized(imgs, ratio)
        t_pred = off_teacher.forward_decoder(lat_t[-1], ids_restore)
        pix, dist, pred, _ = off_student(imgs, ids_keep, ids_restore, mask, t_pred, None, lat_t)
        total = pix.clone()
        for v in dist.values():
            total = total + v
        s_raw = off_student.forward_encoder_student(imgs, ids_keep)[:-1]
        s_proj = [h(x) for h, x in zip(off_student.aligned_feature_projection_heads, s_raw)]
        torch.manual_seed(MASK_SEED)
        latent, mae_mask, mae_restore = off_student.forward_encoder(imgs, ratio)
        mae = off_student.forward_loss(imgs, off_student.forward_decoder(latent, mae_restore), mae_mask)
    return dict(loss_pix=pix.item(), loss_feat=[v.item() for v in dist.values()], loss=total.item(), mae=mae.item(),
                ids_keep=ids_keep, mask=mask, mae_mask=mae_mask, teacher=lat_t[:-1], student=s_raw, projected=s_proj,
                pred=pred)


def harness_losses(h_teacher, h_student, pairs, imgs, ratio):
    kw = dict(mask_ratio=ratio, visible_rounding="official", norm_pix_loss=False)
    obj = DMAEObjective(h_teacher, pairs, alpha=1.0, pixel_weight=1.0, distance="l1", normalize=True,
                        include_cls=True, teacher_mode="partial", **kw)
    s_idx = [p[0] for p in pairs]
    with torch.no_grad():
        torch.manual_seed(MASK_SEED)
        loss, terms = obj(h_student, imgs)
        torch.manual_seed(MASK_SEED)
        masking = obj.draw_mask(h_student, imgs)
        t_feats = obj.teacher_features(imgs, masking)
        _, s_feats = h_student.forward_encoder(imgs, masking.ids_keep, out_blocks=s_idx)
        pred, projected = h_student(imgs, masking, s_idx)
        torch.manual_seed(MASK_SEED)
        mae_loss, _ = MAEObjective(**kw)(h_student, imgs)
        torch.manual_seed(MASK_SEED)
        mae_mask = MAEObjective(**kw).draw_mask(h_student, imgs).mask
    return dict(loss_pix=terms["loss_pix"].item(),
                loss_feat=[terms[f"loss_feat_{k}"].item() for k in range(len(pairs))],
                loss=loss.item(), mae=mae_loss.item(), ids_keep=masking.ids_keep, mask=masking.mask,
                mae_mask=mae_mask, teacher=t_feats, student=[s_feats[i] for i in s_idx], projected=projected,
                pred=pred)


def official_lr_trace(off, lr: float, sched=LR_SCHEDULE) -> List[float]:
    """The lr in effect at every iteration, from the official engine's own loop (train_one_epoch), driven with stub
    models whose forward records the optimizer's lr."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    trace: List[float] = []

    class Student(nn.Module):
        def forward(self, imgs, *args):
            trace.append(optimizer.param_groups[0]["lr"])
            return (param * 0.0).sum() + 1.0, {}, None, None

    class TeacherModule:
        def forward_encoder_customized(self, imgs, ratio):
            return [imgs], None, None, None

        def forward_decoder(self, latent, ids_restore):
            return None

    class Teacher:
        module = TeacherModule()

        def eval(self):
            return self

    def scaler(loss, opt, clip_grad=None, parameters=None, create_graph=False, update_grad=True):
        loss.backward()
        if update_grad:
            opt.step()

    args = types.SimpleNamespace(accum_iter=sched["accum_iter"], lr=lr, min_lr=sched["min_lr"],
                                 warmup_epochs=sched["warmup_epochs"], epochs=sched["epochs"], mask_ratio=0.75,
                                 target_sum_weights=None, aligned_blks_indices=None)
    loader = [(torch.zeros(1), 0)] * sched["steps_per_epoch"]
    sync = torch.cuda.synchronize
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet():
            for epoch in range(sched["epochs"]):
                off.engine.train_one_epoch(Student(), Teacher(), loader, optimizer, torch.device("cpu"), epoch,
                                           scaler, log_writer=None, args=args)
    finally:
        torch.cuda.synchronize = sync
    return trace


def harness_lr_trace(sched=LR_SCHEDULE):
    """The lr in effect at every iteration of harness.core.train.fit (same schedule), recorded by the objective."""
    n = sched["steps_per_epoch"] * sched["batch_size"]
    ds = torch.utils.data.TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long))
    model = nn.Linear(1, 1)
    groups = [{"params": list(model.parameters())}]
    trace: List[float] = []

    def objective(m, x, y):
        trace.append(groups[0]["lr"])  # torch keeps the group dicts it is given
        return m(x).sum() * 0.0 + 1.0, {}

    s = Schedule(epochs=sched["epochs"], warmup_epochs=sched["warmup_epochs"], batch_size=sched["batch_size"],
                 accum_iter=sched["accum_iter"], blr=sched["blr"], min_lr=sched["min_lr"])
    lr = s.blr * (s.batch_size * s.accum_iter * 1) / 256  # fit's own expression (one device)
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()), _quiet():
        fit(model=model, objective=objective, param_groups=groups, dataset=ds, schedule=s, run_dir=Path(d),
            spec_hash="verify", seed=0, rt=Runtime(torch.device("cpu"), log_every=0))
    return lr, trace


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def group_table(model: nn.Module, groups, rename=lambda n: n) -> Dict[str, tuple]:
    """{parameter name: (weight decay, lr scale)} from optimizer parameter groups."""
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            out[names[id(p)]] = (float(g.get("weight_decay", 0.0)), float(g.get("lr_scale", 1.0)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# report


class Report:
    def __init__(self):
        self.failures: List[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}")

    def row(self, label: str, official, harness, ok: bool, delta: Optional[float] = None) -> None:
        d = "" if delta is None else f"{delta:.2e}"
        print(f"  {label:<52} {_fmt(official):>14} {_fmt(harness):>14} {d:>10}  {'ok' if ok else 'DIFFERENT'}")
        if not ok:
            self.failures.append(label)

    def header(self) -> None:
        print(f"  {'':<52} {'official':>14} {'harness':>14} {'|delta|':>10}")

    def compare_value(self, label: str, official: float, harness: float) -> None:
        d = abs(official - harness)
        self.row(label, official, harness, d <= LOSS_ATOL + LOSS_RTOL * abs(official), d)

    def compare_tensor(self, label: str, official: torch.Tensor, harness: torch.Tensor) -> None:
        if official.shape != harness.shape:
            self.row(label, tuple(official.shape), tuple(harness.shape), False)
            return
        d = (official.float() - harness.float()).abs().max().item()
        self.row(f"{label} {tuple(official.shape)}", "", "", d <= FEAT_ATOL, d)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.7g}"
    return str(v)


def compare_groups(rep: Report, title: str, official: Dict[str, tuple], harness: Dict[str, tuple]) -> None:
    """One line per top-level part (blocks.N, decoder_blocks.N, or the parameter)."""
    def part(name):
        bits = name.split(".")
        return ".".join(bits[:2]) if bits[0] in ("blocks", "decoder_blocks", "distill_proj") else name

    parts: Dict[str, List[str]] = {}
    for n in list(official) + [n for n in harness if n not in official]:
        parts.setdefault(part(n), []).append(n)
    rep.section(f"parameter groups, {title}: weight decay / lr scale per parameter "
                f"({len(official)} official, {len(harness)} harness trainable)")
    for p, names in parts.items():
        o = [official.get(n) for n in names]
        h = [harness.get(n) for n in names]
        rep.row(p if len(names) == 1 else f"{p} ({len(names)} tensors)", _summary(o), _summary(h), o == h)


def _summary(vals) -> str:
    if any(v is None for v in vals):
        return "missing"
    decayed = sum(1 for wd, _ in vals if wd > 0)
    scales = sorted({round(s, 6) for _, s in vals})
    return f"wd {decayed}/{len(vals)} s{','.join(f'{s:.4g}' for s in scales)}"


def run(path: Path, shapes: Shapes, golden: bool = False) -> bool:
    torch.set_grad_enabled(True)
    with official_code(path) as off, _quiet():
        rep = Report()
        print(f"official code: {off.path} (commit {official_commit(off.path)})")
        print(f"torch {torch.__version__}; adaptations: " + "; ".join(off.notes))
        print(f"shapes: {shapes.name}: {shapes.img} px, patch {shapes.patch}, teacher {shapes.teacher.embed_dim}-d x "
              f"{shapes.teacher.depth} -> student {shapes.student.embed_dim}-d x {shapes.student.depth}, "
              f"batch {shapes.batch}, fp32 on CPU")
        imgs = seeded_images(shapes)
        golden_values = {"commit": official_commit(off.path), "losses": {}}
        for pairs in shapes.pairs:
            torch.manual_seed(0)
            h_teacher, h_student = harness_models(shapes, pairs)
            o_teacher, o_student, pos = official_models(off, shapes, pairs, h_teacher, h_student)
            if pairs is shapes.pairs[0]:
                rep.section("fixed sin-cos position embeddings, each side's own init")
                rep.header()
                for k, d in pos.items():
                    rep.row(k, "", "", d <= 1e-6, d)
                groups_o = group_table(o_student, off.add_weight_decay(o_student, 0.05), _to_harness_name)
                groups_h = group_table(h_student, param_groups_weight_decay(h_student, 0.05))
                compare_groups(rep, "pre-training (main_distill: add_weight_decay; harness/core/stages.py)", groups_o,
                               groups_h)
            for ratio in MASK_RATIOS:
                o = official_losses(o_teacher, o_student, imgs, ratio)
                h = harness_losses(h_teacher, h_student, pairs, imgs, ratio)
                n_vis = o["ids_keep"].shape[1]
                paper_n = num_visible(h_student.num_patches, ratio, "paper")
                rep.section(f"mask {ratio:.0%}, pairs (student, teacher) {pairs}: {n_vis} of {h_student.num_patches} "
                            f"visible (official int(); the harness default, round(), gives {paper_n})")
                rep.header()
                rep.row("visible ids, mask (same RNG state)", "", "",
                        torch.equal(o["ids_keep"], h["ids_keep"]) and torch.equal(o["mask"], h["mask"])
                        and torch.equal(o["mae_mask"], h["mae_mask"]))
                rep.compare_value("MAE pixel loss", o["mae"], h["mae"])
                rep.compare_value("DMAE pixel loss", o["loss_pix"], h["loss_pix"])
                for k, (a, b) in enumerate(zip(o["loss_feat"], h["loss_feat"])):
                    rep.compare_value(f"feature loss, pair {k} {pairs[k]}", a, b)
                rep.compare_value("feature loss, total (sum over pairs)", sum(o["loss_feat"]), sum(h["loss_feat"]))
                rep.compare_value("DMAE total (alpha 1)", o["loss"], h["loss"])
                for k, (s, t) in enumerate(pairs):
                    rep.compare_tensor(f"teacher block {t} (harness: partial run)", o["teacher"][k], h["teacher"][k])
                    rep.compare_tensor(f"student block {s}", o["student"][k], h["student"][k])
                    rep.compare_tensor(f"student block {s} projected", o["projected"][k], h["projected"][k])
                rep.compare_tensor("decoder prediction", o["pred"], h["pred"])
                golden_values["losses"][(ratio, len(pairs))] = dict(mae=o["mae"], loss_pix=o["loss_pix"],
                                                                    loss_feat=o["loss_feat"], loss=o["loss"])
            del o_teacher, o_student, h_teacher, h_student

        torch.manual_seed(0)
        h_clf = harness_classifier(shapes)
        o_clf = official_classifier(off, shapes, h_clf)
        groups_o = group_table(o_clf, off.lr_decay.param_groups_lrd(o_clf, 0.05, o_clf.no_weight_decay(), 0.75))
        groups_h = group_table(h_clf, param_groups_layer_decay(
            h_clf, 0.05, no_weight_decay_list=h_clf.no_weight_decay(), layer_decay=0.75))
        compare_groups(rep, "fine-tuning, layer decay 0.75 (main_finetune: lr_decay.param_groups_lrd)", groups_o,
                       groups_h)
        rep.section("fine-tuning classifier (global average pool + fc_norm + head)")
        rep.header()
        with torch.no_grad():
            x = imgs
            rep.compare_tensor("logits (official: head(forward_features))", o_clf.head(o_clf.forward_features(x)),
                               h_clf(x))
        del o_clf, h_clf

        lr, h_trace = harness_lr_trace()
        o_trace = official_lr_trace(off, lr)
        s = LR_SCHEDULE
        rep.section(f"lr at every iteration: {s['epochs']} epochs x {s['steps_per_epoch']} steps, accum "
                    f"{s['accum_iter']}, warm-up {s['warmup_epochs']}, lr {lr:.4g} -> min {s['min_lr']:g} "
                    "(official: engine_distill.train_one_epoch)")
        rep.header()
        for i, (a, b) in enumerate(zip(o_trace, h_trace)):
            d = abs(a - b)
            rep.row(f"epoch {i // s['steps_per_epoch']} step {i % s['steps_per_epoch']}", a, b,
                    d <= LR_RTOL * abs(a) + 1e-18, d)
        if len(o_trace) != len(h_trace):
            rep.row("iterations", len(o_trace), len(h_trace), False)
        golden_values["lr"] = o_trace

        ok = not rep.failures
        if golden:
            print("\n# official values (golden), for tests/test_fidelity.py")
            print(f"OFFICIAL_COMMIT = {golden_values['commit']!r}")
            print("OFFICIAL_LOSSES = {")
            for (ratio, n), v in golden_values["losses"].items():
                print(f"    ({ratio}, {n}): dict(mae={v['mae']!r}, loss_pix={v['loss_pix']!r}, "
                      f"loss_feat={v['loss_feat']!r}, loss={v['loss']!r}),")
            print("}")
            print(f"OFFICIAL_LR = {golden_values['lr']!r}")
        print()
        if ok:
            print(f"PASS: harness matches the official DMAE code at {shapes.name} shapes "
                  f"(losses rtol {LOSS_RTOL:g}, features atol {FEAT_ATOL:g}, groups exact, lr rtol {LR_RTOL:g})")
        else:
            print(f"FAIL: {len(rep.failures)} difference(s): {'; '.join(rep.failures[:8])}"
                  f"{' ...' if len(rep.failures) > 8 else ''}")
        return ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.verify_official",
                                 description="Compare this harness with a checkout of the official DMAE code.")
    ap.add_argument("path", help="checkout of github.com/UCSC-VLAA/DMAE (never copied into this repository)")
    ap.add_argument("--paper-shapes", action="store_true",
                    help="ViT-L/16 teacher -> ViT-B/16 student at 224 px (about a minute on one CPU core, "
                         "4.3 GB of memory)")
    ap.add_argument("--golden", action="store_true", help="also print the official values as Python literals")
    args = ap.parse_args(argv)
    try:
        check_checkout(Path(args.path))
        ok = run(Path(args.path), PAPER if args.paper_shapes else SMALL, golden=args.golden)
    except CheckoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
