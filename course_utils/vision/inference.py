"""PyTorch eager behind the course's ``Runner`` interface (``course_utils.core.timing``).

It lives in the vision layer, beside the models it runs, so that the zoo and the pruning stage time
their models with the same ``measure_latency`` as the deployment stages; ``course_utils.deploy.runtimes``
adds the ONNX Runtime and TensorRT runners. PyTorch is imported when a runner is made, not before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from course_utils.core.timing import Runner, RuntimeUnavailableError


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
