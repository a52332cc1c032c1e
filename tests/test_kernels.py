"""`dapo.models.kernels`: choices by measurement, cached per machine; forced and fixed modes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dapo.config import load_config
from dapo.errors import UserError
from dapo.models import kernels
from dapo.preflight import check_train


@pytest.fixture(autouse=True)
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No decisions in the process, an empty cache directory, no DAPO_KERNELS."""
    monkeypatch.setattr(kernels, "_decided", {})
    monkeypatch.setattr(kernels, "_known", {})
    monkeypatch.setenv("DAPO_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    return tmp_path


def sleeper(seconds: dict[str, float], calls: list[str]) -> Callable[[str], Callable[[], object]]:
    """A timer whose candidates take the given seconds per run; records which candidates were set up."""

    def timer(candidate: str) -> Callable[[], object]:
        calls.append(candidate)
        return lambda: time.sleep(seconds[candidate])

    return timer


def test_the_faster_candidate_wins_and_is_cached_in_process_and_on_disk(fresh: Path) -> None:
    calls: list[str] = []
    slow_default = sleeper({"onednn": 0.004, "aten": 0.0}, calls)
    assert kernels.decide("linear", torch.float32, (64, 8, 8, 0), slow_default) == "aten"
    assert sorted(calls) == ["aten", "onednn"]
    calls.clear()
    assert kernels.decide("linear", torch.float32, (64, 8, 8, 0), slow_default) == "aten"
    assert calls == []  # decided once per process
    (path,) = (fresh / "kernels").glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["decisions"] == {"linear:float32:64x8x8x0": "aten"}
    assert saved["machine"]["cpu"] == kernels.cpu_info()["cpu"]
    kernels._decided.clear()
    kernels._known.clear()
    # a new process on the same machine: read from the file, no timing
    assert kernels.decide("linear", torch.float32, (64, 8, 8, 0), slow_default) == "aten"
    assert calls == []
    assert "shape classes decided: linear:float32 aten x1;" in kernels.describe()


def test_processes_on_one_machine_share_one_decision_per_shape_class(fresh: Path) -> None:
    """What another process decided (and wrote) after this one read the cache is taken, not re-timed;
    two deciding at once take turns, so both run the first one's winner; the file keeps every decision."""
    kernels.decide("linear", torch.float32, (64, 8, 8, 0), sleeper({"onednn": 0.0, "aten": 0.004}, []))
    kernels._save(kernels._load(), "inference:float32:64x8x8x0", "aten")  # another process's decision

    def never(candidate: str) -> Callable[[], object]:
        raise AssertionError("decided by another process: not timed again")

    assert kernels.decide("inference", torch.float32, (64, 8, 8, 0), never) == "aten"
    results: list[str] = []

    def decide(winner: str) -> None:  # each "process" would time its own winner
        loser = next(c for c in kernels.CHOICES["decode"] if c != winner)
        timer = sleeper({winner: 0.002, loser: 0.02}, [])
        results.append(kernels.decide("decode", torch.float32, (256, 8), timer))

    threads = [threading.Thread(target=decide, args=(w,)) for w in kernels.CHOICES["decode"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    (path,) = (fresh / "kernels").glob("*.json")
    assert json.loads(path.read_text())["decisions"] == {
        "linear:float32:64x8x8x0": "onednn",
        "inference:float32:64x8x8x0": "aten",
        "decode:float32:256x8": results[0],
    }


def test_near_ties_and_failures_keep_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    clock = [0.0]  # a fake clock: each candidate's run advances it by exactly its cost

    def costs(seconds: dict[str, float]) -> Callable[[str], Callable[[], object]]:
        return lambda candidate: lambda: clock.__setitem__(0, clock[0] + seconds[candidate])

    with monkeypatch.context() as m:
        m.setattr(kernels.time, "perf_counter", lambda: clock[0])
        slightly = costs({"float32": 1.0, "native": 0.98})  # 2% faster: within the 3% margin
        assert kernels.decide("attention", torch.bfloat16, (1,), slightly) == "float32"
        clearly = costs({"float32": 1.0, "native": 0.96})
        assert kernels.decide("attention", torch.bfloat16, (2,), clearly) == "native"

    def broken(candidate: str) -> Callable[[], object]:
        def run() -> object:
            raise RuntimeError("no kernel for this dtype")

        return run if candidate == "matmul" else lambda: None

    # the default of decode in float32 is the matmuls; a failing challenger or default keeps the default
    assert kernels.decide("decode", torch.float32, (2,), broken) == "matmul"
    # the per-dtype defaults: bf16 decode attention is SDPA, bf16 training matmuls are ATen's
    faster_other = sleeper({"sdpa": 0.0, "matmul": 0.003, "onednn": 0.003, "aten": 0.0}, calls)
    assert kernels.decide("decode", torch.bfloat16, (3,), faster_other) == "sdpa"
    assert kernels.decide("linear", torch.bfloat16, (3,), faster_other) == "aten"


def test_default_mode_never_times(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV, "default")

    def never(candidate: str) -> Callable[[], object]:
        raise AssertionError("timed in default mode")

    got = {
        (c, str(d)): kernels.decide(c, d, (1,), never)
        for c in kernels.CHOICES
        for d in (torch.float32, torch.bfloat16)
    }
    assert got == {
        ("linear", "torch.float32"): "onednn", ("linear", "torch.bfloat16"): "aten",
        ("inference", "torch.float32"): "onednn", ("inference", "torch.bfloat16"): "onednn",
        ("attention", "torch.float32"): "float32", ("attention", "torch.bfloat16"): "float32",
        ("decode", "torch.float32"): "matmul", ("decode", "torch.bfloat16"): "sdpa",
        ("precision", "torch.float32"): "model", ("precision", "torch.bfloat16"): "model",
    }  # fmt: skip
    assert kernels.mode() == "default"


def test_forced_by_environment_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(candidate: str) -> Callable[[], object]:
        raise AssertionError("a forced choice was timed")

    monkeypatch.setenv(kernels.ENV, "linear=aten, decode=sdpa")
    assert kernels.decide("linear", torch.float32, (1,), never) == "aten"
    assert kernels.decide("decode", torch.float32, (1,), never) == "sdpa"
    with kernels.forced(linear="onednn"):  # the context wins over the environment, and is undone after
        assert kernels.decide("linear", torch.float32, (1,), never) == "onednn"
        assert kernels.mode() == "linear=onednn,decode=sdpa"
    assert kernels.decide("linear", torch.float32, (1,), never) == "aten"
    monkeypatch.setenv(kernels.ENV, "linear=mkl")
    with pytest.raises(UserError, match=r"DAPO_KERNELS='linear=mkl': bad item 'linear=mkl'; allowed: .*"):
        kernels.decide("linear", torch.float32, (1,), never)
    with pytest.raises(UserError, match="DAPO_KERNELS"):  # `dapo train` says so before building anything
        check_train(load_config("tiny"))
    with pytest.raises(ValueError, match=r"kernels\.forced: attention='bf16'"):
        kernels.forced(attention="bf16").__enter__()


def test_cpu_info_names_the_model_and_the_isa() -> None:
    info = kernels.cpu_info()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["isa"]) <= {  # type: ignore[arg-type]
        "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"
    }  # fmt: skip


def test_timing_a_decision_leaves_the_global_rng_where_it_was() -> None:
    """Whether a shape class was timed now or read from the cache must not change a run's random stream."""

    def workload(candidate: str) -> Callable[[], object]:
        x = kernels.random_like((64, 32), torch.float32)
        w = kernels.random_like((32, 32), torch.float32)
        return lambda: x @ w

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    kernels.decide("linear", torch.float32, (64, 32, 32, 0), workload)
    assert torch.equal(torch.rand(4), expected)


def test_a_checkpoint_stores_the_decisions_and_a_resume_adopts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dapo.checkpoint import load_checkpoint, restore_rng
    from tests.test_checkpoint import save
    from tests.test_train import tiny_model

    monkeypatch.setenv(kernels.ENV, "linear=aten")
    kernels.decide("inference", torch.float32, (64, 8, 8, 0), sleeper({"onednn": 0.0, "aten": 0.004}, []))
    path = save(tmp_path, 1, tiny_model())
    state = load_checkpoint(path).state
    assert state["kernels"]["inference:float32:64x8x8x0"] == "onednn"
    # A new process whose timing (or cache file) would now pick the other candidate: the resume wins.
    kernels._decided.clear()
    kernels._known.clear()
    kernels._save({}, "inference:float32:64x8x8x0", "aten")
    restore_rng(state)

    def never(candidate: str) -> Callable[[], object]:
        raise AssertionError("an adopted decision is not timed again")

    assert kernels.decide("inference", torch.float32, (64, 8, 8, 0), never) == "onednn"
    kernels.adopt({"inference:float32:64x8x8x0": "bogus", "nonsense": "aten"})  # unknown: ignored
    assert kernels.decisions()["inference:float32:64x8x8x0"] == "onednn"


def test_precision_auto_is_timed_once_per_machine_and_only_where_bf16_mixed_can_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dapo.run import resolve_precision

    cfg = load_config("tiny", ["model.device=cpu"])
    assert cfg.actor.precision == "auto"  # the embedded default
    costs = {False: 0.004, True: 0.0}  # bf16 faster (a CPU with AMX)

    def mlp(rows: int, hidden: int, intermediate: int, *, mixed: bool) -> Callable[[], object]:
        assert (rows, hidden, intermediate) == (1024, 192, 1024)  # the tiny model's MLP
        return lambda: time.sleep(costs[mixed])

    monkeypatch.setattr(kernels, "time_mlp", mlp)
    assert resolve_precision(cfg) == "bf16-mixed"
    costs.update({False: 0.0, True: 0.004})
    assert resolve_precision(cfg) == "bf16-mixed"  # decided once: not timed again
    kernels._decided.clear()
    kernels._known.clear()
    kernels._cache_file().unlink()
    assert resolve_precision(cfg) == "model"  # another machine, where float32 is faster
    for override in ("model.dtype=bfloat16", "rollout.engine=vllm"):  # bf16-mixed cannot run: never timed
        monkeypatch.setattr(kernels, "time_mlp", None)
        assert resolve_precision(load_config("tiny", ["model.device=cpu", override])) == "model"
    fixed = load_config("tiny", ["actor.precision=bf16-mixed"])
    assert resolve_precision(fixed) == "bf16-mixed"
    # A resumed run keeps its checkpoint's choice over this machine's cache.
    saved = {"precision:float32:1024x192x1024": "bf16-mixed"}
    assert resolve_precision(cfg, saved) == "bf16-mixed"


def test_a_run_records_the_precision_auto_chose_and_a_resume_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dapo import distributed
    from dapo.run import decide_precision

    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "COMPLETE").write_text("ok\n")
    (run / "checkpoints" / "step_000002" / "state.json").write_text(
        json.dumps({"kernels": {"precision:float32:1024x192x1024": "bf16-mixed"}})
    )
    monkeypatch.setenv(kernels.ENV, "precision=model")  # what this machine would pick now
    fresh_run = load_config("tiny", ["model.device=cpu"])
    decide_precision(fresh_run, distributed.World.single(), tmp_path)
    assert fresh_run.actor.precision == "model"
    assert "precision: model" in (tmp_path / "config.yaml").read_text()
    monkeypatch.delenv(kernels.ENV)
    resumed = load_config("tiny", ["model.device=cpu", "checkpoint.resume=auto"])
    decide_precision(resumed, distributed.World.single(), run)
    assert resumed.actor.precision == "bf16-mixed"
    assert "precision: bf16-mixed" in (run / "config.yaml").read_text()
