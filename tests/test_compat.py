from pathlib import Path

import numpy as np
import pytest
import torch

from course_utils.vision.compat import (
    UnsafeCheckpointError,
    load_checkpoint_safely,
    patch_numpy_in1d,
    state_dict_of,
)


def test_in1d_is_available_and_matches_isin() -> None:
    patch_numpy_in1d()
    assert np.in1d([[1, 5], [3, 7]], [3, 5]).tolist() == [False, True, True, False]


def test_checkpoints_with_numpy_metadata_load_safely(tmp_path: Path) -> None:
    path = tmp_path / "published.pth"
    torch.save({"meta": {"epoch": np.int64(3), "acc": np.float64(0.9), "hist": np.arange(3)},
                "state_dict": {"w": torch.ones(2)}}, path)
    if not hasattr(torch.serialization, "add_safe_globals"):  # torch 2.3 (JetPack 6.0): no allowlist to extend
        with pytest.raises(UnsafeCheckpointError, match="numpy.*torch 2.4 can"):
            load_checkpoint_safely(path)
        torch.save({"meta": {"epoch": 3}, "state_dict": {"w": torch.ones(2)}}, path)
        assert torch.equal(state_dict_of(load_checkpoint_safely(path))["w"], torch.ones(2))
        return
    checkpoint = load_checkpoint_safely(path)
    assert torch.equal(state_dict_of(checkpoint)["w"], torch.ones(2))
    assert checkpoint["meta"]["hist"].tolist() == [0, 1, 2]


def test_training_checkpoints_with_pickled_objects_are_refused(tmp_path: Path) -> None:
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(1.0)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": {}, "message_hub": buffer}, path)
    with pytest.raises(UnsafeCheckpointError, match="HistoryBuffer.*extract its weights"):
        load_checkpoint_safely(path)


def test_state_dict_conventions() -> None:
    weights = {"w": torch.zeros(1)}
    assert state_dict_of({"state_dict": weights}) is weights
    assert state_dict_of({"model": weights}) is weights
    assert state_dict_of(weights) is weights
