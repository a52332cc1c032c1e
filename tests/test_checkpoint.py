"""Checkpoints: atomic layout, rotation, weights-only loading, corrupt ones reported and skipped."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from dapo.backends.policy import make_actor, restore_policy
from dapo.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sharded_checkpoint,
)
from dapo.config import Config
from dapo.errors import UserError
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


def as_data_parallel(path: Path) -> Path:
    """Make `path` look like a checkpoint written by N ranks: DCP's `sharded/` and the schedule alone in
    `optimizer.pt` (the sharded optimizer state lives in `sharded/`)."""
    (path / "sharded").mkdir()
    (path / "sharded" / ".metadata").write_bytes(b"dcp metadata")
    torch.save({"scheduler": {"last_epoch": 1}}, path / "optimizer.pt")
    return path


def resume_auto_config() -> Config:
    cfg = Config()
    cfg.checkpoint.resume = "auto"
    cfg.model.dtype = "float32"
    return cfg


def test_a_data_parallel_checkpoint_resumed_in_one_process_is_a_user_error(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path, 1, model, keep_last=5)
    dp = as_data_parallel(save(tmp_path, 2, model, keep_last=5))
    actor = make_actor(resume_auto_config(), tiny_model())
    with pytest.raises(UserError, match=r"step_000002 .*torchrun.*model\.path=.*step_000002/model"):
        restore_policy(resume_auto_config(), tmp_path, actor)
    cfg = resume_auto_config()
    cfg.checkpoint.resume = str(dp)  # named explicitly: the same error
    with pytest.raises(UserError, match=r"step_000002 .*torchrun"):
        restore_policy(cfg, tmp_path, actor)


def test_a_single_process_checkpoint_found_by_a_data_parallel_resume_is_a_user_error(tmp_path: Path) -> None:
    model = tiny_model()
    as_data_parallel(save(tmp_path, 1, model, keep_last=5))
    save(tmp_path, 2, model, keep_last=5)
    # the predicate a data-parallel `restore_policy` hands `latest_checkpoint`: an error, not a skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=r"step_000002 .*single-process.*model\.path="):
            latest_checkpoint(tmp_path, lambda d: sharded_checkpoint(d.parent))


def test_a_truncated_weights_file_is_skipped_for_the_previous_checkpoint(tmp_path: Path) -> None:
    model = tiny_model()
    good = save(tmp_path, 1, model, keep_last=5)
    bad = save(tmp_path, 2, model, keep_last=5)
    weights = bad / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000002"):
        found = latest_checkpoint(tmp_path, load_pretrained)
    assert found is not None and found[0].path == good


def test_no_loadable_checkpoint_left_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    bad = save(tmp_path, 1, tiny_model())
    (bad / "optimizer.pt").write_bytes(b"")
    with (
        pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000001"),
        pytest.raises(UserError, match=r"no checkpoint of .* loads"),
    ):
        latest_checkpoint(tmp_path, load_pretrained)
    assert latest_checkpoint(tmp_path / "elsewhere", load_pretrained) is None  # none at all: a fresh start


def test_rotation_never_deletes_a_checkpoint_newer_than_the_one_written(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path, 5, model, keep_last=1)
    save(tmp_path, 1, model, keep_last=1)  # resumed from an older checkpoint (step 5 did not load)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000005"]
    save(tmp_path, 2, model, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000005"]
    save(tmp_path, 5, model, keep_last=1)  # step 5 written again: the older ones go
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005"]


def test_files_are_flushed_before_the_rename_and_the_previous_checkpoint_deleted_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    save(tmp_path, 1, model, keep_last=1)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd: int) -> None:
        events.append(("fsync", str(Path(f"/proc/self/fd/{fd}").readlink())))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_replace(src, dst)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("delete", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    root = tmp_path / "checkpoints"
    save(tmp_path, 2, model, keep_last=1)

    tmp = root / ".tmp-step_000002"
    rename = events.index(("rename", f"{tmp} -> {root / 'step_000002'}"))
    flushed = [path for kind, path in events[:rename] if kind == "fsync"]
    for name in ("model/model.safetensors", "model/config.json", "optimizer.pt", "state.json", "COMPLETE"):
        assert str(tmp / name) in flushed, name
    assert flushed.index(str(tmp / "COMPLETE")) > flushed.index(str(tmp / "state.json"))  # marker last
    assert str(tmp) in flushed  # the directory entries too
    delete = events.index(("delete", str(root / "step_000001")))
    assert rename < events.index(("fsync", str(root))) < delete  # the new one durable, then the old one goes
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]


def test_saving_a_step_again_replaces_it_after_the_new_copy_is_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model()
    save(tmp_path, 1, model, keep_last=1)
    real_rmtree = shutil.rmtree
    seen: list[bool] = []

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        real_rmtree(path, *args, **kwargs)
        seen.append(bool(list_checkpoints(tmp_path)))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    save(tmp_path, 1, model, keep_last=1)
    assert seen and all(seen)  # no deletion leaves the run without a complete checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
