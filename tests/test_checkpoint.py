"""Checkpoints: atomic layout, rotation, weights-only loading, corrupt ones reported and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dapo.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dapo.models import load_pretrained
from tests.test_train import tiny_model


def save(run: Path, step: int, model: torch.nn.Module, keep_last: int = 2) -> Path:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    return save_checkpoint(
        run, step, model, None, {"optimizer": opt.state_dict()}, {"k": step}, keep_last=keep_last
    )


def test_save_load_round_trip_and_rotation(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (1, 2, 3):
        save(tmp_path, step, model)
    paths = list_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step_000002", "step_000003"]  # keep_last=2
    ckpt = load_checkpoint(paths[-1])
    assert ckpt.state["step"] == 3 and ckpt.state["k"] == 3
    assert set(ckpt.optimizer["optimizer"]) == {"state", "param_groups"}
    loaded = load_pretrained(ckpt.model_dir)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_partial_and_corrupt_checkpoints_are_reported_and_skipped(tmp_path: Path) -> None:
    model = tiny_model()
    good = save(tmp_path, 1, model, keep_last=5)
    bad = save(tmp_path, 2, model, keep_last=5)
    (bad / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"step_000002 is corrupt"):
        load_checkpoint(bad)
    # a crash mid-save leaves a .tmp directory without the COMPLETE marker: never listed
    (tmp_path / "checkpoints" / ".tmp-step_000003").mkdir()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000002"):
        found = latest_checkpoint(tmp_path, load_pretrained)
    assert found is not None and found[0].path == good
    (good / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="partial"):
        load_checkpoint(good)


def test_optimizer_state_is_loaded_without_unpickling_objects(tmp_path: Path) -> None:
    path = save(tmp_path, 1, tiny_model())
    torch.save(
        {"evil": object()}, path / "optimizer.pt"
    )  # arbitrary objects are refused by weights_only loading
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
