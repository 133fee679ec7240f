"""Datasets and transforms.

- `fashion_mnist`: the embedded default, read from Debian's `dataset-fashion-mnist` package (real images, no
  download at run time), kept in memory as uint8 and served as RGB PIL images so every transform is the ImageNet one.
- `imagefolder`: ImageNet-style `root/train/<class>/*` and `root/val/<class>/*` (torchvision ImageFolder).

Transforms follow the official code: pre-training RandomResizedCrop(scale 0.2-1, bicubic) + flip; fine-tuning timm's
create_transform (RandAug, random erasing); evaluation Resize(img/crop_pct) + CenterCrop.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataError(ValueError):
    """A dataset is missing or has the wrong layout."""


@dataclass(frozen=True)
class DataSpec:
    name: str  # fashion_mnist | imagefolder
    root: str
    img_size: int
    train_subset: int = 0  # 0 = all images; otherwise a fixed (seed 0) random subset of this size
    val_subset: int = 0
    eval_crop_pct: float = 0.875


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


def check_imagefolder(root: str) -> None:
    """Fail early, with the path, on a missing or malformed ImageNet-style tree."""
    base = Path(root)
    for split in ("train", "val"):
        d = base / split
        if not d.is_dir():
            raise DataError(f"data.root={root!r}: expected the folder {d} (ImageNet layout root/{{train,val}}/<class>/)")
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


def check_data(spec: DataSpec) -> None:
    if spec.name == "fashion_mnist":
        for split in ("train", "val"):
            for n in FASHION_FILES[split]:
                if not (Path(spec.root) / n).is_file():
                    FashionMNIST(spec.root, split)  # raises DataError with the install hint
    elif spec.name == "imagefolder":
        check_imagefolder(spec.root)
    else:
        raise DataError(f"data.name must be 'fashion_mnist' or 'imagefolder', got {spec.name!r}")


def pretrain_transform(img_size: int):
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def finetune_transform(img_size: int, randaug: str, reprob: float):
    from timm.data import create_transform
    return create_transform(input_size=img_size, is_training=True, auto_augment=randaug or None,
                            interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(img_size: int, crop_pct: float):
    resize = int(round(img_size / crop_pct))
    return transforms.Compose([
        transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _subset(ds: Dataset, n: int) -> Dataset:
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(0)  # the same subset for every stage and seed
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


def build_dataset(spec: DataSpec, split: str, transform) -> Tuple[Dataset, int]:
    """Returns (dataset, num_classes)."""
    if spec.name == "fashion_mnist":
        ds = FashionMNIST(spec.root, split, transform)
        num_classes = len(FashionMNIST.classes)
    elif spec.name == "imagefolder":
        check_imagefolder(spec.root)
        ds = datasets.ImageFolder(str(Path(spec.root) / split), transform=transform)
        num_classes = len(ds.classes)
    else:
        raise DataError(f"data.name must be 'fashion_mnist' or 'imagefolder', got {spec.name!r}")
    return _subset(ds, spec.train_subset if split == "train" else spec.val_subset), num_classes


def num_classes_of(spec: DataSpec) -> int:
    if spec.name == "fashion_mnist":
        return len(FashionMNIST.classes)
    return len([c for c in (Path(spec.root) / "train").iterdir() if c.is_dir()])


def loader(ds: Dataset, batch_size: int, train: bool, epoch_seed: Optional[int], num_workers: int = 0,
           rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """Training loaders shuffle with a per-epoch seed (DistributedSampler.set_epoch), so an epoch's order does not
    depend on what ran before it; that makes resume from checkpoint-last bit-identical."""
    from torch.utils.data.distributed import DistributedSampler
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=train, seed=0, drop_last=train)
    if epoch_seed is not None:
        sampler.set_epoch(epoch_seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=train,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)
