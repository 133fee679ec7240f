"""The input-pipeline benchmark: images/s of the transforms a profile's stages load data with."""
from __future__ import annotations

import time
from typing import List, Sequence, Tuple

import torch

from harness.core.data import Aug, FashionMNIST, build_dataset, loader
from harness.core.spec import DataConfig
from harness.bench.spec import profile_cfg, profile_data


def bench_data(profiles: Sequence[str], n_images: int, root: str, threads: int = 0, log=print) -> List[dict]:
    """Images/s of the input pipelines, one process, on Fashion-MNIST, through the same build_dataset / loader the
    stages use (batched tensor transforms for the in-memory dataset; the per-image PIL pipeline when RandAug is on).
    Torch threads as the profile's stages load data: run.threads in the main process (num_workers=0)."""
    out, seen = [], set()
    default_threads = torch.get_num_threads()
    for prof in profiles:
        c = profile_cfg(prof)
        run_cfg = c["run"]
        workers = int(run_cfg.get("num_workers") or 0)
        torch.set_num_threads(threads or (1 if workers else int(run_cfg.get("threads") or 0)) or default_threads)
        for d in profile_data(prof):
            key = (d["transform"], d["img_size"], d["randaug"], d["reprob"])
            if key in seen:
                continue
            seen.add(key)
            n = n_images if d["img_size"] < 128 else max(32, n_images // 8)
            batch = min(d["batch"], n)
            aug = Aug(d["transform"], d["img_size"], crop_min=float(c.get(d["transform"], {}).get("crop_min", 0.2))
                      if d["transform"] != "eval" else 0.2, randaug=d["randaug"], reprob=d["reprob"],
                      crop_pct=d.get("crop_pct", 1.0))
            try:
                ds, _ = build_dataset(DataConfig("fashion_mnist", root, d["img_size"], train_subset=n + batch),
                                      "train", aug)
            except Exception as e:  # no dataset here: say so, measure the rest
                log(f"  data: skipped ({e})")
                return out
            def timed(dataset) -> Tuple[int, float]:
                it = iter(loader(dataset, batch, d["transform"] != "eval", 0, workers))
                next(it)  # warm-up batch
                t0, seen_imgs = time.perf_counter(), 0
                for imgs, _ in it:
                    seen_imgs += imgs.shape[0]
                return seen_imgs, time.perf_counter() - t0

            seen_imgs, dt = timed(ds)
            row = dict(d, profile=prof, images=seen_imgs, seconds=dt, images_per_s=seen_imgs / dt,
                       s_per_image=dt / seen_imgs, threads=torch.get_num_threads(), profile_num_workers=workers,
                       pipeline="batched tensors" if aug.batched else "per-image PIL",
                       note="" if d["img_size"] < 128 else "28x28 Fashion-MNIST upscaled by the transforms; "
                       "ImageNet JPEG decoding not included")
            if aug.batched:  # the per-image PIL pipeline the stages used before, on the same images, right after
                pil = torch.utils.data.Subset(FashionMNIST(root, "train", aug.pil()), range(n + batch))
                pil_imgs, pil_dt = timed(pil)
                row.update(pil_images_per_s=pil_imgs / pil_dt, speedup_vs_pil=(seen_imgs / dt) / (pil_imgs / pil_dt))
            out.append(row)
            log(f"  data {prof} {d['transform']} {d['img_size']}px randaug={d['randaug'] or '-'} ({row['pipeline']}): "
                f"{row['images_per_s']:.0f} img/s" + (f"; per-image PIL {row['pil_images_per_s']:.0f} img/s, "
                                                      f"{row['speedup_vs_pil']:.0f}x" if aug.batched else ""))
    return out
