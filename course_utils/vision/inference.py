"""PyTorch eager behind the course's ``Runner`` interface (``course_utils.core.timing``).

It lives in the vision layer, beside the models it runs, so that the zoo and the pruning stage time
their models with the same ``measure_latency`` as the deployment stages; ``course_utils.deploy.runtimes``
adds the ONNX Runtime and TensorRT runners. PyTorch is imported when a runner is made, not before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from course_utils.core.timing import Runner, RuntimeUnavailableError, compare_threads


class TorchRunner(Runner):
    """PyTorch eager. ``device="cuda"`` moves the model to the GPU; ``threads`` sets PyTorch's CPU threads."""

    runtime = "pytorch"

    def __init__(self, model: Any, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailableError("device='cuda' but PyTorch sees no CUDA GPU: use device='cpu'.")
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device
        self.model = model.to(device).eval()

    @property
    def threads(self) -> int | None:
        import torch

        return torch.get_num_threads() if self.device == "cpu" else None

    def run(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        return logits.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def compare_thread_counts(counts: Sequence[int] | None = None, repeats: int = 5) -> dict[int, float]:
    """Median milliseconds of a small conv-net forward at each thread count (default 1..cores).

    Each count is timed by ``core.timing.compare_threads`` over a ``TorchRunner`` (which sets PyTorch's
    threads). On a busy 2-core machine one thread is often faster than two: measure before choosing.
    The previous thread setting is restored afterwards.
    """
    import torch

    counts = counts or tuple(range(1, (os.cpu_count() or 1) + 1))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
    ).eval()
    previous = torch.get_num_threads()
    try:
        timings = compare_threads(lambda threads: TorchRunner(net, threads=threads), counts, batch=4,
                                  input_size=160, warmup=1, iterations=repeats)
    finally:
        torch.set_num_threads(previous)
    return {threads: latency.p50_ms for threads, latency in timings.items()}
