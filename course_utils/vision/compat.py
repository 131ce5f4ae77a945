"""Compatibility fixes for running mmpretrain 1.2 (2023) on torch 2.3 to 2.14 and numpy 1.26 to 2.4, in one place.

Every fix says what breaks and why the fix is safe. Stages call these functions; no notebook
patches a library itself.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from course_utils.core.errors import CourseError


@functools.cache
def patch_numpy_in1d() -> None:
    """numpy 2.4 removed ``np.in1d``, which mmpretrain's retrieval metrics still call.

    ``np.isin`` on flattened input is exactly what ``in1d`` computed, so the alias is safe.
    Classification accuracy does not use it; the patch only keeps ``import`` paths working.
    """
    if not hasattr(np, "in1d"):
        np.in1d = lambda a, b, *args, **kwargs: np.isin(np.ravel(a), b, *args, **kwargs)  # type: ignore[attr-defined]


def import_mmpretrain() -> Any:
    """Import mmpretrain with the numpy fix applied and its import-time chatter silenced."""
    patch_numpy_in1d()
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; mmpretrain warns about them although classification needs none.
        warnings.simplefilter("ignore")
        import mmpretrain
    return mmpretrain


def _checkpoint_globals() -> list[Any]:
    """The plain-data numpy types that published mmpretrain checkpoints pickle in their ``meta``.

    torch >= 2.6 loads with ``weights_only=True`` by default and refuses them. Rather than turning
    the safety off (which would run arbitrary pickled code from a downloaded file), the course
    allows exactly these types. mmengine *training* checkpoints also pickle a ``HistoryBuffer``
    whose reduction needs ``getattr``, which would allow arbitrary attribute access: those are
    refused with an explanation; the course's own checkpoints never contain one.
    """
    from numpy._core.multiarray import _reconstruct, scalar

    # Checkpoints pickled under numpy 1.x name these ``numpy.core.*``; numpy 2 moved them to ``numpy._core``.
    allowed: list[Any] = [np.ndarray, np.dtype, _reconstruct, scalar,
                          (_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


class UnsafeCheckpointError(CourseError, RuntimeError):
    """A checkpoint that pickles objects the course will not unpickle."""


@contextlib.contextmanager
def _allowing_checkpoint_globals() -> Iterator[str | None]:
    """Within it, ``torch.load(weights_only=True)`` also takes :func:`_checkpoint_globals`; yields why it cannot.

    torch >= 2.5 scopes the allowance to the block (``safe_globals``). torch 2.4 (JetPack 6.0) has only the
    process-wide ``add_safe_globals``: registering these plain-data types for the process is as safe, and
    idempotent. torch 2.3 has no way to extend its allowlist: checkpoints that are tensors and plain Python
    (the course's own, EfficientNet-Lite's) load; one with numpy metadata is refused, saying why.
    """
    import torch

    serialization: Any = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals(_checkpoint_globals()):
            yield None
    elif hasattr(serialization, "add_safe_globals"):
        serialization.add_safe_globals([entry for entry in _checkpoint_globals() if not isinstance(entry, tuple)])
        yield None
    else:
        yield f"torch {torch.__version__} cannot allow numpy's plain types in a weights-only load (torch 2.4 can)"


def load_checkpoint_safely(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``, allowing only numpy's plain-data types besides tensors."""
    import pickle

    import torch

    with _allowing_checkpoint_globals() as limitation:
        try:
            return torch.load(Path(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path} pickles more than weights ({detail}{'; ' + limitation if limitation else ''}). The course "
                "does not unpickle arbitrary objects. If you trust the file, extract its weights once: "
                "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')."
            ) from None


def state_dict_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights inside a checkpoint, whichever convention it follows (mmengine, timm, plain)."""
    for key in ("state_dict", "model", "model_state"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def init_random_weights(model: Any) -> None:
    """``mmpretrain.get_model(name, pretrained=False)`` does not call ``init_weights()``.

    Left at PyTorch's per-layer defaults instead of the architecture's own initialisation, such
    models train poorly and explode under QAT fake-quant (gradients ~1e34). Call it explicitly.
    """
    if hasattr(model, "init_weights"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.init_weights()


@contextlib.contextmanager
def quiet_mmengine() -> Iterator[None]:
    """Silence mmengine's chatter (registry warnings, a line per parameter from ``init_weights``)."""
    import logging

    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _unbind_attention_forward(self: Any, x: Any) -> Any:
    """mmpretrain 1.2's ``MultiheadAttention.forward`` with ``qkv.unbind(0)`` and a width read from the heads.

    Identical arithmetic; only the two marked lines differ from mmpretrain's own forward.
    """
    B, N, _ = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # was qkv[0], qkv[1], qkv[2]
    attn_drop = self.attn_drop if self.training else 0.0
    x = self.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
    x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dims)  # was self.embed_dims
    x = self.proj(x)
    x = self.out_drop(self.gamma1(self.proj_drop(x)))
    if self.v_shortcut:
        x = v.squeeze(1) + x
    return x


def fix_mmpretrain_attention(model: Any) -> list[Any]:
    """Make mmpretrain's ViT attention layers traceable by Torch-Pruning; return them.

    ``MultiheadAttention.forward`` splits q, k, v by indexing ``qkv[0..2]``; Torch-Pruning's dependency
    graph cannot map channels through that indexing (IndexError while tracing), but it understands
    ``torch.unbind``, which returns the same three tensors. The reshape after attention also reads
    ``embed_dims``, fixed at build time, where the pruned width is ``num_heads * head_dims``. The fix
    replaces ``forward`` on these instances only (exactly this class: subclasses such as Twins' have
    their own forward), so other models and other code are untouched; it is idempotent.
    """
    import types

    fixed = []
    for module in model.modules():
        kind = type(module)
        if kind.__name__ == "MultiheadAttention" and kind.__module__ == "mmpretrain.models.utils.attention":
            if getattr(module.forward, "__func__", None) is not _unbind_attention_forward:
                module.forward = types.MethodType(_unbind_attention_forward, module)
            fixed.append(module)
    return fixed


@functools.cache
def patch_swin_window_reverse() -> None:
    """mmpretrain's Swin computes the batch in ``ShiftWindowMSA.window_reverse`` with Python ``int()``.

    Both ONNX exporters record that number as a constant, so the exported graph is silently wrong at
    every batch size but the traced one (stage 04 checks parity at batch 1, 3 and 8 to catch exactly
    this). Letting ``view`` infer the batch (``-1``) computes the same tensor in eager mode and exports a
    dynamic reshape, so the fix is safe for training too. Applied by ``onnx_export.export_onnx``.
    """
    import_mmpretrain()
    from mmpretrain.models.utils.attention import ShiftWindowMSA

    def window_reverse(windows: Any, H: int, W: int, window_size: int) -> Any:  # mmpretrain's signature
        channels = windows.shape[-1]
        x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, channels)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, channels)

    ShiftWindowMSA.window_reverse = staticmethod(window_reverse)
