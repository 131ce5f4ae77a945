"""Compatibility fixes for running mmpretrain 1.2 (2023) on torch 2.14 and numpy 2.4, in one place.

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


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that pickles objects the course will not unpickle."""


def load_checkpoint_safely(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``, allowing only numpy's plain-data types besides tensors."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path} pickles more than weights ({detail}). The course does not unpickle arbitrary objects. "
            "If you trust the file, extract its weights once: "
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
    """Silence mmengine's registry and logger chatter while building models."""
    import logging

    logger = logging.getLogger("mmengine")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
