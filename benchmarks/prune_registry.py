"""Which registry backbones Torch-Pruning prunes correctly: forward, ONNX export and reload after pruning.

Every backbone is built with random weights (no downloads), pruned at ratio 0.5 with L2 importance, then
checked: one score per class, ONNX export with a dynamic batch matching ONNX Runtime at batch 3, and
``load_pruned`` giving identical logits (reload diff 0). Refused backbones show the course's reason.
The failures found this way decide ``course_utils.vision.prune.UNPRUNABLE``.
Run: ``.venv/bin/python benchmarks/prune_registry.py [names...]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from course_utils.vision import prune, zoo


def export_matches(model: zoo.Classifier, folder: Path) -> float:
    """Largest |PyTorch - ONNX Runtime| logit difference at batch 3 (exported at batch 2, dynamic batch),
    relative to the largest logit: random weights give some backbones logits of 1e11."""
    import onnxruntime

    path = folder / "model.onnx"
    torch.onnx.export(model, (prune.example_input(model, batch_size=2),), str(path), dynamo=False,
                      opset_version=17, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    images = torch.randn(3, 3, model.preprocessing.input_size, model.preprocessing.input_size)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.inference_mode():
        expected = model(images)
    return float((torch.from_numpy(logits) - expected).abs().max() / expected.abs().max())


def check(name: str) -> dict[str, object]:
    """One row: sizes before and after pruning and the three checks, or the error that stopped them."""
    import torch_pruning as tp

    started = time.perf_counter()
    row: dict[str, object] = {"name": zoo.entry(name).alias}
    try:
        model = zoo.load(name, ["a", "b"], pretrained=False)
        macs, params = tp.utils.count_ops_and_params(model, prune.example_input(model))
        row.update(params_M=params / 1e6, macs_G=macs / 1e9)
        pruned = prune.prune_classifier(model, ratio=0.5)
        macs_after, params_after = tp.utils.count_ops_and_params(pruned, prune.example_input(pruned))
        row.update(params_after=params_after / params, macs_after=macs_after / macs)
        with tempfile.TemporaryDirectory() as folder:
            row["onnx_diff"] = export_matches(pruned, Path(folder))
            prune.save_pruned(pruned, Path(folder) / "pruned.pt")
            reloaded = prune.load_pruned(Path(folder) / "pruned.pt")
            images = prune.example_input(pruned, batch_size=2).normal_()
            with torch.inference_mode():
                row["reload_diff"] = float((reloaded(images) - pruned(images)).abs().max())
    except Exception as error:  # noqa: BLE001 - a survey: record every failure and go on to the next backbone
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    row["seconds"] = time.perf_counter() - started
    return row


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| backbone | params M | GMACs | params kept | MACs kept | ONNX rel. diff | reload diff | s "
          "| error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names or list(zoo.REGISTRY):
        row = check(name)
        cells = [str(row["name"])] + [f"{row[k]:.2f}" if k in row else "" for k in
                                      ("params_M", "macs_G", "params_after", "macs_after")]
        cells += [f"{row[k]:.1e}" if k in row else "" for k in ("onnx_diff", "reload_diff")]
        cells += [f"{row['seconds']:.0f}", str(row.get("error", ""))]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
