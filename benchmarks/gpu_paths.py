"""The CUDA paths of the course that CI cannot run, each once, with its figures: a table per path.

1. PyTorch inference (``TorchRunner``) of a zoo backbone on CUDA against the CPU, FP32 and autocast FP16.
2. Quantization-aware training on CUDA: the QAT stage's own steps on the smoke spec (``qat.fake_quantize``,
   ``qat.fine_tune``, ``qat.export_qdq_onnx``), the Q/DQ export checked on ONNX Runtime's CPU.
3. diffusers' memory options on the tiny random-weight pipeline (``imagegen.build_tiny_pipeline``): float32
   and float16, attention slicing, VAE tiling; seconds per picture and peak GPU memory.

Usage: python benchmarks/gpu_paths.py [--backbone efficientnet-lite0] [--picture-size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from course_utils.core.report import markdown_table
from course_utils.core.timing import measure_latency
from course_utils.vision import zoo
from course_utils.vision.inference import TorchRunner


def inference_rows(backbone: str, size: int) -> list[dict[str, Any]]:
    """p50 latency and throughput of the backbone at batch 1 and 8: CPU FP32, CUDA FP32, CUDA autocast FP16."""
    rows = []
    model = zoo.load(backbone, classes=["a", "b"]).eval()
    for device, autocast in (("cpu", False), ("cuda", False), ("cuda", True)):
        runner = TorchRunner(model, device=device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            for batch in (1, 8):
                latency = measure_latency(runner, batch, size, warmup=5, iterations=30 if device == "cuda" else 10)
                rows.append({"path": "TorchRunner", "device": device, "precision": "fp16 autocast" if autocast
                             else "fp32", "batch": batch, "p50_ms": round(latency.p50_ms, 3),
                             "images_per_s": round(latency.throughput, 1)})
    return rows


def qat_rows(backbone: str) -> list[dict[str, Any]]:
    """The QAT stage's own path on the smoke spec: fake-quantize (CPU calibration, as ``qat.run``), fine-tune with
    ``qat.fine_tune`` (which trains on CUDA when present), export Q/DQ, check parity on ONNX Runtime's CPU."""
    from course_utils.core.config import load_config
    from course_utils.deploy import qat
    from course_utils.deploy.calibration import build_calibration_set
    from course_utils.deploy.onnx_export import model_sha256
    from course_utils.deploy.runtimes import top1, validation_arrays
    from course_utils.vision.data import resolve_dataset

    with tempfile.TemporaryDirectory() as folder:
        config = load_config("smoke", {"workspace": folder, "model.backbone": backbone}, environ={})
        dataset = resolve_dataset(config)
        model = zoo.load(backbone, classes=dataset.classes)
        transform = model.preprocessing.eval_transform()
        calibration = build_calibration_set(dataset.samples["train"], transform, 32, 8, 0)
        images, labels = validation_arrays(dataset.samples["val"], transform)
        sha = model_sha256(model)
        started = time.perf_counter()
        qat.fake_quantize(model, calibration)
        calibrate_s = time.perf_counter() - started
        started = time.perf_counter()
        trained = qat.fine_tune(model, dataset, config, qat.run_key(sha, calibration, config, "qat"))
        train_s = time.perf_counter() - started
        on_gpu = next(model.parameters()).device.type
        cuda_top1 = top1(TorchRunner(model, device="cuda"), images, labels)
        path = qat.export_qdq_onnx(model.cpu(), Path(folder) / "qat.onnx", model.preprocessing.input_size)
        parity = qat.onnx_parity(model, path, images, threads=4)
    return [{"path": "QAT (ModelOpt) fine-tuning", "trained_on": on_gpu, "quantizers": qat.enabled_quantizers(model),
             "calibrate_s": round(calibrate_s, 2), "epochs": len(trained.history), "train_s": round(train_s, 1),
             "val_top1_cuda": round(cuda_top1, 3), "onnx_agreement": parity.agreement,
             "onnx_max_abs_diff": round(parity.max_abs_diff, 4), "val_images": parity.images}]


def imagegen_rows(size: int) -> list[dict[str, Any]]:
    """Seconds per picture and peak GPU memory of the tiny pipeline under each memory option."""
    import diffusers

    from course_utils.genai.imagegen import build_tiny_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        location = build_tiny_pipeline(Path(folder) / "tiny")
        for dtype, slicing, tiling in ((torch.float32, False, False), (torch.float16, False, False),
                                       (torch.float16, True, False), (torch.float16, True, True)):
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(location, dtype=dtype, local_files_only=True)
            pipe.to("cuda")
            pipe.set_progress_bar_config(disable=True)
            if slicing:
                pipe.enable_attention_slicing()
            if tiling:
                pipe.vae.enable_tiling()
            pipe("a bee", num_inference_steps=2, guidance_scale=0.0, height=size, width=size)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(5):
                pipe("a bee on a flower", num_inference_steps=4, guidance_scale=0.0, height=size, width=size)
            torch.cuda.synchronize()
            rows.append({"path": "tiny diffusers pipeline", "dtype": str(dtype).split(".")[-1],
                         "attention_slicing": slicing, "vae_tiling": tiling, "size": size,
                         "s_per_picture_4_steps": round((time.perf_counter() - started) / 5, 4),
                         "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
            del pipe
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--picture-size", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_paths.py measures CUDA paths: this machine has no CUDA GPU.")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})\n")
    for rows in (inference_rows(args.backbone, args.size), qat_rows(args.backbone),
                 imagegen_rows(args.picture_size)):
        print(markdown_table(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
