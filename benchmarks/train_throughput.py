"""Training throughput of the course's fine-tuning code on this machine (CPU, or CUDA with AMP).

Prints one row per epoch and a summary; the same `finetune.fit` the notebooks use, nothing special-cased.
Usage: python benchmarks/train_throughput.py [--device cuda] [--dataset package-textures] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from course_utils.core.config import load_config
from course_utils.core.report import markdown_table
from course_utils.vision import finetune
from course_utils.vision.data import resolve_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dataset", default="package-textures")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = finetune.pick_device(args.device)
    with tempfile.TemporaryDirectory() as workspace:
        config = load_config("default", {
            "workspace": workspace, "dataset.name": args.dataset, "model.backbone": args.backbone,
            "train.batch_size": args.batch_size, "train.num_workers": args.workers, "train.epochs_head": 1, "train.epochs_finetune": args.epochs - 1,
        })
        dataset = resolve_dataset(config)
        _, result, evaluation = finetune.train_classifier(config, dataset, device=device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({args.threads} thread(s))"
    rows = [{"device": name, "amp": device.type == "cuda", "epoch": r.epoch + 1, "phase": r.phase,
             "batch": args.batch_size, "train_images_per_s": round(r.images_per_second, 1),
             "val_top1": round(r.val_top1, 3)} for r in result.history]
    print(markdown_table(rows))
    finetuned = [r.images_per_second for r in result.history if r.phase == "finetune"]
    print(f"\n{name}: fine-tune phase {sum(finetuned) / max(1, len(finetuned)):.1f} images/s; "
          f"final val top-1 {evaluation.top1:.3f} on {dataset.name}")


if __name__ == "__main__":
    main()
