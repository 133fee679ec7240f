"""Datasets, splits and transforms.

- `fashion_mnist`: the embedded default, read from Debian's `dataset-fashion-mnist` package (real images, no
  download at run time), kept in memory as uint8.
- `imagefolder`: ImageNet-style `root/train/<class>/*` and `root/val/<class>/*` (torchvision ImageFolder).

Splits (the same for every stage and seed):

    train   the training images less the `holdout`, optionally a fixed subset of `train_subset` of them
    val     `holdout` images carved out of the training images (fixed, seed 0): the only split tuning and per-epoch
            monitoring may read; empty when holdout = 0 (then fine-tuning logs no per-epoch accuracy)
    test    Fashion-MNIST's 10k test images / ImageNet's val/ folder (optionally `test_subset` of them): read by the
            final evaluation stage only

Transforms follow the official code: pre-training RandomResizedCrop(scale crop_min-1, official 0.2) + flip;
fine-tuning timm's create_transform (RandomResizedCrop scale crop_min-1 + flip, RandAug, random erasing); evaluation
Resize(img/crop_pct) + CenterCrop. An in-memory dataset (Fashion-MNIST) applies them to whole batches of tensors
(`TensorImages`: crop boxes drawn as torchvision draws them, one affine resample per batch instead of a PIL
pipeline per image; bilinear instead of bicubic);
RandAug needs PIL, so a fine-tune with `randaug` set uses the per-image pipeline.
"""
from __future__ import annotations

import gzip
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

from harness.core.spec import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataError(ValueError):
    """A dataset is missing or has the wrong layout."""


def _read_idx(path: Path, offset: int) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the Debian package: 60k train / 10k test, 28x28 grey, 10 classes (images at byte 16 and
    labels at byte 8 of the gunzipped IDX files)."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

    def __init__(self, root: str, split: str, transform=None):
        images_file, labels_file = FASHION_FILES[split]
        root_path = Path(root)
        missing = [n for n in (images_file, labels_file) if not (root_path / n).is_file()]
        if missing:
            raise DataError(
                f"Fashion-MNIST not found: {', '.join(str(root_path / n) for n in missing)} missing. "
                "Install Debian's package: `apt-get install dataset-fashion-mnist` (or `make data`), "
                "or set data.root to a folder holding the four IDX .gz files.")
        self.images = _read_idx(root_path / images_file, 16).view(-1, 28, 28)
        self.targets = _read_idx(root_path / labels_file, 8).long()
        if len(self.images) != len(self.targets):
            raise DataError(f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i].numpy(), mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def check_imagefolder(root: str, every_class: bool = False) -> None:
    """Fail early, with the path, on a missing or malformed ImageNet-style tree. every_class (the preflight, before
    anything is submitted): also every class folder of both splits holds an image, as torchvision's ImageFolder
    requires (it would otherwise fail inside the job); stops at each folder's first image, cheap on ImageNet."""
    base = Path(root)
    for split in ("train", "val"):
        d = base / split
        if not d.is_dir():
            raise DataError(f"data.root={root!r}: expected the folder {d} "
                            "(ImageNet layout root/{train,val}/<class>/)")
        classes = [c for c in d.iterdir() if c.is_dir()]
        if not classes:
            raise DataError(f"{d} has no class folders (expected {d}/<class>/<image>)")
        if not any(f.is_file() for c in classes[:5] for f in c.iterdir()):
            raise DataError(f"{d}: the first class folders hold no images")
    train_classes = sorted(c.name for c in (base / "train").iterdir() if c.is_dir())
    val_classes = sorted(c.name for c in (base / "val").iterdir() if c.is_dir())
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DataError(f"{base}: train/ has {len(train_classes)} classes and val/ has {len(val_classes)}; "
                        f"they must match (only in train/: {only_train or '-'}; only in val/: {only_val or '-'})")
    if every_class:
        for split in ("train", "val"):
            _check_every_class_has_an_image(base / split)


def _check_every_class_has_an_image(d: Path) -> None:
    empty = [c.name for c in sorted(d.iterdir()) if c.is_dir()
             and not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in c.iterdir())]
    if empty:
        raise DataError(f"{d}: {len(empty)} class folder(s) hold no image ({', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}); expected {d}/<class>/<image> "
                        f"({', '.join(IMG_EXTENSIONS[:4])}, ...)")


def check_data(spec: DataConfig, every_class: bool = False) -> None:
    """The dataset exists with the expected layout (DataError otherwise); every_class: see check_imagefolder."""
    if spec.name == "fashion_mnist":
        for split in ("train", "val"):
            for n in FASHION_FILES[split]:
                if not (Path(spec.root) / n).is_file():
                    FashionMNIST(spec.root, split)  # raises DataError with the install hint
    elif spec.name == "imagefolder":
        check_imagefolder(spec.root, every_class)
    else:
        raise DataError(f"data.name must be 'fashion_mnist' or 'imagefolder', got {spec.name!r}")


@dataclass(frozen=True)
class Aug:
    """What a stage does to its input images, for both pipelines: `pil()` builds the per-image torchvision/timm
    transform, `TensorImages` applies the same steps to whole batches."""
    kind: str  # pretrain | finetune | eval
    img_size: int
    crop_min: float = 0.2  # RandomResizedCrop scale (crop_min, 1)
    randaug: str = ""
    reprob: float = 0.0
    crop_pct: float = 1.0  # eval: Resize(img_size / crop_pct) + CenterCrop(img_size)

    @property
    def batched(self) -> bool:
        return not self.randaug

    def pil(self):
        if self.kind == "pretrain":
            return transforms.Compose([
                transforms.RandomResizedCrop(self.img_size, scale=(self.crop_min, 1.0),
                                             interpolation=InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        if self.kind == "finetune":
            return create_transform(input_size=self.img_size, is_training=True, auto_augment=self.randaug or None,
                                    scale=(self.crop_min, 1.0), interpolation="bicubic", re_prob=self.reprob,
                                    re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        resize = int(round(self.img_size / self.crop_pct))
        return transforms.Compose([
            transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def crop_boxes(b: int, height: int, width: int, crop_min: float, g: torch.Generator):
    """RandomResizedCrop(scale=(crop_min, 1), ratio=(3/4, 4/3)) boxes for b images, drawn as torchvision's get_params
    draws them: up to 10 tries of an area and an aspect ratio, rounded to whole pixels, the first that fits the image;
    else the central-crop fallback (the whole image for a square input). Returns (top, left, h, w) in pixels, floats."""
    tries = 10
    area = torch.empty(b, tries).uniform_(crop_min, 1.0, generator=g) * (height * width)
    ratio = torch.empty(b, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).exp()
    w = (area * ratio).sqrt().round()  # torchvision: int(round(sqrt(target_area * aspect_ratio)))
    h = (area / ratio).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(1)
    pick = fits.float().argmax(1, keepdim=True)  # the first try that fits
    w = torch.where(found, w.gather(1, pick).squeeze(1), torch.tensor(float(width)))
    h = torch.where(found, h.gather(1, pick).squeeze(1), torch.tensor(float(height)))
    top = torch.where(found, (torch.rand(b, generator=g) * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (torch.rand(b, generator=g) * (width - w + 1)).floor(), (width - w) // 2)
    return top, left, h, w


def random_resized_crop_flip(x: torch.Tensor, out: int, crop_min: float, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (boxes as torchvision draws them, `crop_boxes`) + horizontal flip on a batch (B, C, H, W),
    one affine resample for all images. scale=(1, 1) gives the whole image, flipped or not: a crop that is the whole
    image at the output size is copied, not resampled."""
    b, _, height, width = x.shape
    top, left, h, w = crop_boxes(b, height, width, crop_min, g)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)  # normalised coordinates [-1, 1]: scale = crop / image, shift = crop centre
    theta[:, 0, 0], theta[:, 1, 1] = w / width * flip, h / height
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, x.shape[1], out, out], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    whole = (w == width) & (h == height)
    if out == width == height and whole.any():
        y[whole] = torch.where(flip[whole].view(-1, 1, 1, 1) < 0, x[whole].flip(-1), x[whole])
    return y


class TensorImages(Dataset):
    """An in-memory split (uint8 images (N, H, W) grey or (N, 3, H, W)) whose transform runs on whole batches:
    `batch(indices, generator)` returns normalised RGB (B, 3, img, img) and labels. Indexing one image works too
    (the same transform on a batch of one), for code that expects a map-style dataset."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, aug: Aug):
        self.images, self.targets, self.aug = images, targets, aug
        self._erase = None
        if aug.kind == "finetune" and aug.reprob > 0:
            self._erase = RandomErasing(aug.reprob, mode="pixel", device="cpu")

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: torch.Tensor, g: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx].float().div_(255.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        a = self.aug
        if a.kind in ("pretrain", "finetune"):
            x = random_resized_crop_flip(x, a.img_size, a.crop_min, g)
        else:
            resize = int(round(a.img_size / a.crop_pct))
            if resize != x.shape[-1]:
                x = F.interpolate(x, size=(resize, resize), mode="bicubic", align_corners=False, antialias=True)
            top = (x.shape[-1] - a.img_size) // 2
            x = x[..., top:top + a.img_size, top:top + a.img_size]
        x = (x - _MEAN) / _STD
        if self._erase is not None:
            x = self._erase(x)
        return x.contiguous(), self.targets[idx]

    @property
    def flip_only(self) -> bool:
        """Every training input is an image or its mirror, bit for bit: no crop (scale 1 at the native size), no
        erasing."""
        return (self.aug.kind == "finetune" and self.aug.crop_min >= 1.0 and self._erase is None
                and self.images.shape[-1] == self.images.shape[-2] == self.aug.img_size)

    def flip_views(self, batch_size: int = 512):
        """The inputs a flip-only training split can produce, in batches: each image normalised, then mirrored
        (element-wise the same arithmetic as `batch`, so the bytes are equal)."""
        ident = TensorImages(self.images, self.targets, Aug("eval", self.aug.img_size, crop_pct=1.0))
        for s in range(0, len(self), batch_size):
            x = ident.batch(torch.arange(s, min(s + batch_size, len(self))), None)[0]
            yield x
            yield x.flip(-1).contiguous()

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]), torch.Generator().manual_seed(i))
        return x[0], int(y[0])


class TensorBatches:
    """The batches of one epoch of a TensorImages split, as DistributedSampler + DataLoader would cut them: training
    shuffles with a generator seeded by (seed, epoch) and drops the last partial batch; rank r of w takes every w-th
    index. Augmentation draws from its own (seed, epoch, rank) generator, never from the global RNG, so the masks an
    objective draws are the same whatever the augmentation does (paired rows)."""

    def __init__(self, ds: TensorImages, batch_size: int, train: bool, epoch: int, seed: int, rank: int, world: int):
        self.ds, self.bs, self.train = ds, batch_size, train
        self.epoch, self.seed, self.rank, self.world = epoch, seed, rank, world
        n = len(ds)
        if train:
            per_rank = n // world
            self.n_batches = per_rank // batch_size
        else:
            self.n_batches = math.ceil(len(range(rank, n, world)) / batch_size)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        n = len(self.ds)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
            idx = order[:n // self.world * self.world][self.rank::self.world]
        else:
            idx = torch.arange(self.rank, n, self.world)
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) % 2 ** 62 + 1)
        for b in range(self.n_batches):
            yield self.ds.batch(idx[b * self.bs:(b + 1) * self.bs], g)


def _split_indices(n: int, holdout: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices of a training set of n images: a fixed (seed 0) permutation, the first `holdout` of it
    for validation."""
    if holdout >= n:
        raise DataError(f"data.holdout={holdout} leaves no training image of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[holdout:], perm[:holdout]


def _take(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The first n of a fixed order (0 = all): a subset that grows by adding images, the same for every stage."""
    return idx if not n or n >= len(idx) else idx[:n]


def build_dataset(spec: DataConfig, split: str, aug: Aug) -> Tuple[Dataset, int]:
    """Returns (dataset, num_classes) for split train | val | test (see the module docstring)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if split == "val" and not spec.holdout:
        raise DataError("no validation split: data.holdout is 0")
    if spec.name == "fashion_mnist":
        base = FashionMNIST(spec.root, "val" if split == "test" else "train")
        num_classes = len(FashionMNIST.classes)
        if split == "test":
            g = torch.Generator().manual_seed(0)
            idx = _take(torch.randperm(len(base), generator=g), spec.test_subset) if spec.test_subset else \
                torch.arange(len(base))
        else:
            tr, va = _split_indices(len(base), spec.holdout)
            idx = _take(tr, spec.train_subset) if split == "train" else va
        if aug.batched:
            return TensorImages(base.images[idx], base.targets[idx], aug), num_classes
        base.transform = aug.pil()
        return Subset(base, idx.tolist()), num_classes
    if spec.name == "imagefolder":
        check_imagefolder(spec.root)
        ds = datasets.ImageFolder(str(Path(spec.root) / ("val" if split == "test" else "train")), transform=aug.pil())
        num_classes = len(ds.classes)
        if split == "test":
            if spec.test_subset and spec.test_subset < len(ds):
                g = torch.Generator().manual_seed(0)
                ds = Subset(ds, torch.randperm(len(ds), generator=g)[:spec.test_subset].tolist())
            return ds, num_classes
        tr, va = _split_indices(len(ds), spec.holdout)
        idx = _take(tr, spec.train_subset) if split == "train" else va
        return (ds if split == "train" and len(idx) == len(ds) else Subset(ds, idx.tolist())), num_classes
    raise DataError(f"data.name must be 'fashion_mnist' or 'imagefolder', got {spec.name!r}")


def num_classes_of(spec: DataConfig) -> int:
    if spec.name == "fashion_mnist":
        return len(FashionMNIST.classes)
    return len([c for c in (Path(spec.root) / "train").iterdir() if c.is_dir()])


# The scheduler's requeue and stop signals: USR2 (time limit near / preemption, submitit's and harness.core.stages'
# requeue handlers) and TERM (preemption, scancel)
WORKER_IGNORED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def worker_init(worker_id: int) -> None:
    """DataLoader workers are forked from a rank's main process and inherit its Python signal handlers, and Slurm
    signals every process of a job step: each worker would run submitit's requeue too. A worker ignores USR2 and
    TERM instead (SIG_IGN, not SIG_DFL: a worker killed by them makes the main process's DataLoader raise 'worker
    exited unexpectedly' from its SIGCHLD handler, possibly inside the requeue handler, turning a preemption into a
    failure). Workers end with their main process (the loader's shutdown, or its exit); only the main process of
    rank 0 requeues."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def loader(ds: Dataset, batch_size: int, train: bool, epoch_seed: Optional[int], num_workers: int = 0,
           rank: int = 0, world: int = 1, seed: int = 0):
    """One epoch's batches. Training shuffles with (seed, epoch) (DistributedSampler.set_epoch), so an epoch's order
    does not depend on what ran before it (resume from checkpoint-last is bit-identical) and the same seed gives the
    same order in every row. Evaluation (train=False) gives rank r of w every w-th image, in order, nothing dropped."""
    if isinstance(ds, TensorImages):
        return TensorBatches(ds, batch_size, train, epoch_seed or 0, seed, rank, world)
    if not train:
        shard = Subset(ds, list(range(rank, len(ds), world)))
        return torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           worker_init_fn=worker_init)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if epoch_seed is not None:
        sampler.set_epoch(epoch_seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False, worker_init_fn=worker_init)
