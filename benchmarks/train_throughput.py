"""Training throughput of the course's fine-tuning stage on this machine: CPU, or CUDA with AMP on or off, 1 or N GPUs.

Prints one row per epoch and a summary line; the stage's own entry point (``finetune.run``, which starts N DDP
processes for ``--gpus N``), nothing special-cased. ``--repeat K`` trains on K copies of the training split, so a
small data set gives a GPU enough steps per epoch to measure (validation stays as it is).
Usage: python benchmarks/train_throughput.py [--device cuda] [--gpus 2] [--no-amp] [--repeat 8] [--epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.vision import finetune
from course_utils.vision.data import resolve_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--gpus", type=int, default=1, help="data-parallel processes (train.gpus)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="float16 autocast + GradScaler on CUDA (train.amp)")
    parser.add_argument("--dataset", default="package-textures")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--repeat", type=int, default=1, help="copies of the training split")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stage picks CUDA whenever it sees one
    with tempfile.TemporaryDirectory() as workspace:
        config = load_config("default", {
            "workspace": workspace, "dataset.name": args.dataset, "model.backbone": args.backbone,
            "train.batch_size": args.batch_size, "train.num_workers": args.workers, "train.gpus": args.gpus,
            "train.amp": args.amp, "train.epochs_head": 1, "train.epochs_finetune": args.epochs - 1,
        })
        dataset = resolve_dataset(config)
        dataset = dataclasses.replace(dataset, samples={**dataset.samples,
                                                        "train": dataset.samples["train"] * args.repeat})
        result = finetune.run(config, dataset)
    device = finetune.pick_device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({args.threads} thread(s))"
    amp = finetune.mixed_precision(config.train, device)
    rows = [{"device": name, "gpus": args.gpus, "amp": amp, "epoch": r.epoch + 1, "phase": r.phase,
             "global_batch": args.batch_size * args.gpus, "train_images_per_s": round(r.images_per_second, 1),
             "val_top1": round(r.val_top1, 3)} for r in result.training.history]
    print(markdown_table(rows))
    finetuned = [r.images_per_second for r in result.training.history if r.phase == "finetune"]
    print(f"\n{name} x{args.gpus}, AMP {'on' if amp else 'off'}: fine-tune phase "
          f"{sum(finetuned) / max(1, len(finetuned)):.1f} images/s; final val top-1 {result.evaluation.top1:.3f} "
          f"on {dataset.name} ({len(dataset.samples['train'])} training images)")


if __name__ == "__main__":
    main()
