"""Cluster mode on Ray (`trainer.backend=ray`: `dapo.backends.ray`, the actors of `dapo.cluster`) on one
local Ray cluster of 4 logical CPUs shared by these tests (one torch thread per actor), and a two-node
`ray.cluster_utils.Cluster`.

The tiny preset's short run (4 steps) with 1 trainer rank and 2 rollout workers is the reference: its
workers' weights are checksummed against the trainer's after every sync; a run whose worker is killed
mid-generation, and a run whose driver is killed and resumed, end with its weights bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from safetensors.torch import load_file

from dapo.backends import ray as ray_backend
from dapo.config import load_config
from dapo.models import kernels
from dapo.trainer import train
from tests.test_e2e import SHORT

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RAY = ["trainer.backend=ray", "trainer.collective_timeout_s=300"]


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray cluster for every test here: 4 logical CPUs on any machine, no dashboard."""
    ray.init(
        address="local",  # a cluster of its own, whatever else runs on the machine
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def ray_run(tmp: Path, name: str, *overrides: str) -> Path:
    cfg = load_config(
        None, [*SHORT, *RAY, f"trainer.output_dir={tmp}", f"trainer.run_name={name}", *overrides]
    )
    return train(cfg).run_dir


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step_s" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert ckpt.name == "step_000004"
    if (ckpt / "adapter").is_dir():  # a LoRA run: its adapters
        return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    return load_file(str(ckpt / "model" / "model.safetensors"))


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equal(b[name]), name


def driver(ray_address: str, tmp: Path, *overrides: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`dapo train` of the short Ray run named "driver" in a child process, on the tests' Ray cluster; call
    it with extra arguments and environment variables."""
    args = [*SHORT, *RAY, *overrides, f"trainer.output_dir={tmp}", "trainer.run_name=driver"]

    def dapo(*extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dapo", "train", *args, *extra],
            env={**os.environ, "RAY_ADDRESS": ray_address, **env}, capture_output=True, text=True,
            timeout=900, cwd=REPO,
        )  # fmt: skip

    return dapo


def remember_backends(mp: pytest.MonkeyPatch) -> list[ray_backend.RayBackend]:
    """Every `RayBackend` built while ``mp`` is active, in order (a test reaches the workers' pids)."""
    backends: list[ray_backend.RayBackend] = []
    real_init = ray_backend.RayBackend.__init__

    def remember(self: ray_backend.RayBackend, *args: Any) -> None:
        backends.append(self)
        real_init(self, *args)

    mp.setattr(ray_backend.RayBackend, "__init__", remember)
    return backends


def check_syncs(mp: pytest.MonkeyPatch, before: bool = True) -> list[tuple[str, list[str], list[str]]]:
    """Every weight sync while ``mp`` is active, checked: (trainer rank 0's digest after it, the workers'
    before it (empty without ``before``), the workers' after it)."""
    checks: list[tuple[str, list[str], list[str]]] = []
    real = ray_backend.RayBackend.sync_weights

    def checked(self: ray_backend.RayBackend) -> dict[str, float]:
        digests_before = self.checksums()[1] if before else []
        out = real(self)
        want, got = self.checksums()
        checks.append((want, digests_before, got))
        return out

    mp.setattr(ray_backend.RayBackend, "sync_weights", checked)
    return checks


def assert_synced(checks: list[tuple[str, list[str], list[str]]], workers: int) -> None:
    """After each sync every worker's digest equals that of trainer rank 0's full weights, and before it
    they differ (the update changed the weights: a sync that moved nothing fails the check)."""
    assert len(checks) >= 3
    for want, before, got in checks:
        assert got == [want] * workers
        assert all(b != want for b in before)


@pytest.fixture(scope="module")
def reference(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The reference run (1 trainer rank, 2 rollout workers), every weight sync checked."""
    with pytest.MonkeyPatch.context() as mp:
        checks = check_syncs(mp)
        run_dir = ray_run(tmp_path_factory.mktemp("ref"), "ref", "rollout.num_workers=2")
    yield {"run_dir": run_dir, "checks": checks, "weights": final_weights(run_dir)}


def test_one_rank_two_workers_syncs_every_update(reference: dict[str, Any]) -> None:
    rows = metrics(reference["run_dir"])
    updated = [r for r in rows if "actor/updates" in r]
    assert len(updated) == len(reference["checks"])
    assert_synced(reference["checks"], workers=2)
    versions = [r["rollout/weights_version"] for r in updated]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert all(r["rollout/weight_sync_mb"] > 0 and r["time/weight_sync_s"] > 0 for r in updated)
    assert all(r["rollout/worker_restarts"] == 0 for r in rows)


def test_a_worker_killed_mid_generation_is_restarted_and_the_run_unchanged(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    """Worker 1 is SIGKILLed while step 2's first round is in flight: Ray restarts it, it gets the current
    weights, its share is generated again with the same seed, and the run ends with the reference's
    weights."""
    real = ray_backend.wait
    calls = {"generate": 0}

    def kill_during_generate(refs: Any, names: Any, timeout_s: float, what: str) -> list[Any]:
        if what == "generate":
            calls["generate"] += 1
            if calls["generate"] == 3:  # evaluation before training, step 1, then step 2 in flight
                pool = backends[-1].engine
                os.kill(pool.pids[1], signal.SIGKILL)
        return real(refs, names, timeout_s, what)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_backend, "wait", kill_during_generate)
        backends = remember_backends(mp)
        run_dir = ray_run(tmp_path, "killed", "rollout.num_workers=2")
    rows = metrics(run_dir)
    assert sum(r["rollout/worker_restarts"] for r in rows) == 1
    assert_equal_weights(final_weights(run_dir), reference["weights"])


@pytest.mark.parametrize(
    "when", ["update", "weight sync", "after the weight sync"], ids=["update", "push", "after-push"]
)
def test_a_worker_killed_while_idle_or_in_the_push_is_revived_before_it_samples(
    reference: dict[str, Any], tmp_path: Path, when: str
) -> None:
    """Worker 1 is SIGKILLed during step 2's update (idle), as step 2's weights are pushed, or just after
    (idle again): Ray restarts it holding the model's initial weights; the push forms a new group and sends
    the current weights, or the worker refuses to sample with weights of another version and gets them
    first. Each sync leaves every worker with trainer rank 0's weights, and the run ends with the
    reference's."""
    real = ray_backend.wait
    seen = {"update": 0, "weight sync": 0, "checksum": 0}

    def kill_worker_1(wait_for_restart: bool = False) -> None:
        pool = backends[-1].engine
        old = pool.pids[1]
        os.kill(old, signal.SIGKILL)
        while wait_for_restart:  # back, idle, holding the model's initial weights
            try:
                if ray.get(backends[-1].workers[1].ready.remote(), timeout=60)[0] != old:
                    return
            except ray.exceptions.RayActorError:
                time.sleep(0.2)

    def kill_at(refs: Any, names: Any, timeout_s: float, what: str) -> list[Any]:
        if what in seen:
            seen[what] += 1
        if what == when and seen[what] == 2:  # step 2's update, or step 2's push
            kill_worker_1()
        out = real(refs, names, timeout_s, what)
        if when == "after the weight sync" and what == "checksum" and seen[what] == 4:  # step 2's, checked
            kill_worker_1(wait_for_restart=True)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_backend, "wait", kill_at)
        backends = remember_backends(mp)
        checks = check_syncs(mp, before=False)  # (asking a worker that is restarting would fail)
        run_dir = ray_run(tmp_path, "idle", "rollout.num_workers=2")
    rows = metrics(run_dir)
    assert sum(r["rollout/worker_restarts"] for r in rows) == 1
    for want, _, got in checks:
        assert got == [want] * 2
    assert_equal_weights(final_weights(run_dir), reference["weights"])


def test_resume_after_killing_the_driver_is_bit_identical(
    reference: dict[str, Any], ray_address: str, tmp_path: Path
) -> None:
    dapo = driver(ray_address, tmp_path, "rollout.num_workers=2")
    killed = dapo(DAPO_SIGNAL_AT="update:3:KILL")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in (tmp_path / "driver" / "checkpoints").glob("step_*")] == ["step_000002"]
    resumed = dapo("--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_equal_weights(final_weights(tmp_path / "driver"), reference["weights"])


def test_two_trainer_ranks(ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync streams the gathered shards from rank 0 in buckets (1 MiB here: several per sync) and
    keeps them in rank 0's full copy: every worker holds exactly those weights after each sync."""
    checks = check_syncs(monkeypatch)
    run_dir = ray_run(
        tmp_path, "two", "trainer.world_size=2", "rollout.num_workers=2", "rollout.weight_sync_bucket_mb=1"
    )
    assert (run_dir / "checkpoints" / "step_000004" / "sharded" / ".metadata").is_file()
    updated = [r for r in metrics(run_dir) if "actor/updates" in r]
    assert len(updated) == len(checks) and all(r["rollout/weight_sync_mb"] > 1 for r in updated)
    assert_synced(checks, workers=2)


def test_a_dying_trainer_rank_stops_the_run_naming_it(ray_address: str, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [*SHORT, *RAY, "trainer.world_size=2", f"trainer.output_dir={tmp_path}", "trainer.run_name=dies"],
    )
    os.environ["DAPO_SIGNAL_AT"] = "rank_update:3:KILL:1"
    try:
        with pytest.raises(ray_backend.ClusterError, match="trainer rank 1 of 2 died during update"):
            train(cfg)
    finally:
        del os.environ["DAPO_SIGNAL_AT"]
    assert [p.name for p in (tmp_path / "dies" / "checkpoints").glob("step_*")] == ["step_000002"]


def test_two_node_cluster(tmp_path: Path) -> None:
    """A `ray.cluster_utils.Cluster` of two nodes (its own Ray, in a child process)."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.ray_two_nodes", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    placed = json.loads((tmp_path / "nodes.json").read_text())
    assert set(placed["placed"]) == {"trainer rank 0", "rollout worker 0", "rollout worker 1"}
    assert len(set(placed["placed"].values())) == 2 == len(placed["nodes"])
    assert (tmp_path / "two-nodes" / "checkpoints" / "step_000002" / "COMPLETE").is_file()


ASYNC = ["rollout.num_workers=2", "trainer.async_rollout_steps=1", "algorithm.rollout_is_cap=2.0"]


@pytest.fixture(scope="module")
def async_reference(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference run with trainer.async_rollout_steps=1 (2 rollout workers, TIS on)."""
    run_dir = ray_run(tmp_path_factory.mktemp("async"), "async", *ASYNC)
    return {"run_dir": run_dir, "weights": final_weights(run_dir)}


def test_async_rollout_generates_the_next_step_during_the_update(
    reference: dict[str, Any], async_reference: dict[str, Any]
) -> None:
    """trainer.async_rollout_steps=1: every batch after the first was collected during the previous update
    (staleness 1), and truncated importance sampling corrects against the stale engine's log-probs."""
    rows = metrics(async_reference["run_dir"])
    staleness = [r["rollout/staleness"] for r in rows]
    updated = ["actor/updates" in r for r in rows]
    assert staleness[0] == 0.0
    for i in range(1, len(rows)):  # ahead exactly when the step before updated
        assert staleness[i] == float(updated[i - 1])
    assert sum(staleness) >= 2
    weights = async_reference["weights"]
    assert any(not weights[n].equal(reference["weights"][n]) for n in weights)


def test_async_a_worker_killed_during_the_ahead_collection_copies_a_peer_and_the_run_is_unchanged(
    async_reference: dict[str, Any], tmp_path: Path
) -> None:
    """Worker 1 is SIGKILLed while the ahead collection (during an update) generates: the restarted worker
    copies the pre-update weights from worker 0 (trainer rank 0 already holds the updated ones), its share
    is generated again, and the run ends with the uninterrupted async run's weights."""
    real = ray_backend.wait
    killed: list[str] = []

    def kill_during_ahead(refs: Any, names: Any, timeout_s: float, what: str) -> list[Any]:
        if what == "generate" and not killed and threading.current_thread().name.startswith("dapo-ahead"):
            killed.append(what)
            os.kill(backends[-1].engine.pids[1], signal.SIGKILL)
        return real(refs, names, timeout_s, what)

    calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray_backend, "wait", kill_during_ahead)
        backends = remember_backends(mp)
        mp.setattr(
            ray_backend.WeightSync, "form_group", spy(ray_backend.WeightSync.form_group, calls, "group")
        )
        mp.setattr(ray_backend.WeightSync, "resend", spy(ray_backend.WeightSync.resend, calls, "resend"))
        run_dir = ray_run(tmp_path, "async-killed", *ASYNC)
    assert killed and sum(r["rollout/worker_restarts"] for r in metrics(run_dir)) == 1
    assert calls == ["group", "group"]  # at the start, then before the push after the copy; no resend
    assert_equal_weights(final_weights(run_dir), async_reference["weights"])


def spy(fn: Any, calls: list[str], name: str) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapped


def test_async_resume_after_killing_the_driver_is_bit_identical(
    async_reference: dict[str, Any], ray_address: str, tmp_path: Path
) -> None:
    """The driver is SIGKILLed as update 3 begins: the checkpoint of step 2 holds step 3's batch,
    collected ahead during update 2, and the resumed run trains on it and ends with the uninterrupted run's
    weights."""
    dapo = driver(ray_address, tmp_path, *ASYNC)
    killed = dapo(DAPO_SIGNAL_AT="update:3:KILL")
    assert killed.returncode == -9, killed.stderr[-3000:]
    (ckpt,) = (tmp_path / "driver" / "checkpoints").glob("step_*")
    assert ckpt.name == "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["collector"]["ahead"]["step"] == 3
    resumed = dapo("--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_equal_weights(final_weights(tmp_path / "driver"), async_reference["weights"])


OBJECTIVES = {
    "dapo": [],
    # CISPO with RLOO's baseline and sequence-level masked importance sampling against the worker's log-probs
    "cispo-rloo-seq-is": [
        "algorithm.policy_loss=cispo", "algorithm.eps_low=1.0", "algorithm.dual_clip_c=null",
        "algorithm.advantage=rloo", "algorithm.rollout_is_cap=2.0", "algorithm.rollout_is_level=sequence",
        "algorithm.rollout_is_mode=mask",
    ],
    # GSPO with REINFORCE++'s batch-normalised baseline
    "gspo-reinforce++": [
        "algorithm.ratio_level=sequence", "algorithm.eps_low=0.0003", "algorithm.eps_high=0.0004",
        "algorithm.loss_aggregation=seq-mean-token-mean", "algorithm.dual_clip_c=null",
        "algorithm.advantage=reinforce_plus_plus",
    ],
    # LoRA: the workers receive the adapters only
    "lora": ["actor.lora.rank=4", "actor.lr=1e-3"],
}  # fmt: skip
"""The objectives (`algorithm.*`), and LoRA, run in Ray mode as in one process (the same code)."""


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_one_worker_samples_and_trains_what_one_process_does(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str
) -> None:
    """1 trainer rank + 1 rollout worker: the round's seed is the worker's, the update the single-process
    one, so the run ends with the local run's weights bit for bit, for DAPO and for the other objectives.
    The kernels are forced (the driver's DAPO_KERNELS reaches the actors): the trainer rank runs 1 thread
    where the local run has 2, and each thread count times its own kernel choices, which may differ (oneDNN
    and ATen agree to rounding only)."""
    monkeypatch.setenv(kernels.ENV, "precision=model,linear=aten,inference=aten,attention=float32")
    settings = OBJECTIVES[objective]
    local = load_config(None, [*SHORT, *settings, f"trainer.output_dir={tmp_path}", "trainer.run_name=local"])
    ray_dir = ray_run(tmp_path, "ray", "rollout.num_workers=1", *settings)
    assert_equal_weights(final_weights(ray_dir), final_weights(train(local).run_dir))
    if objective.startswith("gspo"):
        assert all(0 <= r["actor/seq_clip_frac"] <= 1 for r in metrics(ray_dir) if "actor/updates" in r)
    if objective == "lora":  # 4 layers x 7 projections x rank 4 x (in + out) float32 values: ~0.14 MiB
        synced = [r["rollout/weight_sync_mb"] for r in metrics(ray_dir) if "rollout/weight_sync_mb" in r]
        assert synced and all(0 < mb < 0.5 for mb in synced), synced


def test_the_default_recipe_learns_in_ray_mode(ray_address: str, tmp_path: Path) -> None:
    """The embedded default in Ray mode (1 trainer rank, 2 rollout workers), shortened to 30 steps and
    evaluated with k = 16 (as `test_default_recipe_learns_on_a_short_run`): held-out avg@16 rises by at
    least 5 points (0.374 -> 0.472 measured on a Zen 5: the one-process run's figures, as the samples do not
    depend on the layout)."""
    cfg = load_config(
        None,
        [*RAY, "rollout.num_workers=2", "trainer.total_steps=30", "evaluation.k=16",
         "evaluation.every_steps=0", "checkpoint.every_steps=0", "logging.progress_bar=false",
         "logging.tensorboard=false",
         f"trainer.output_dir={tmp_path}", "trainer.run_name=learn"],
    )  # fmt: skip
    result = train(cfg)
    before, after = result.eval_before["eval/arithmetic/avg@16"], result.eval_after["eval/arithmetic/avg@16"]
    print(f"avg@16 {before:.3f} -> {after:.3f}")
    assert after - before >= 0.05, (before, after)


def test_a_remote_call_past_its_timeout_stops_with_a_message(
    ray_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    @ray.remote(num_cpus=0)
    def hangs() -> None:
        import time

        time.sleep(60)

    ref = hangs.remote()
    with pytest.raises(ray_backend.ClusterError, match=r"generate timed out after 1 s .* on worker 7"):
        ray_backend.wait([ref], ["worker 7"], 1.0, "generate")
    assert "remote call generate timed out" in capsys.readouterr().err
    ray.cancel(ref, force=True)


def test_a_local_cluster_too_small_for_the_run_fails_at_once() -> None:
    """A cluster this process started never grows: asking it for more than it has fails before placing
    anything, naming what is short; a cluster joined by address may scale up, so it is waited for."""
    need = {"CPU": 3.0}
    with pytest.raises(ray_backend.ClusterError, match=r"needs 3 CPU \(it has 2\) on the local Ray cluster"):
        ray_backend.check_fits(need, {"CPU": 2.0, "memory": 1e9}, local=True)
    with pytest.raises(ray_backend.ClusterError, match=r"needs 1 GPU \(it has 0\)"):
        ray_backend.check_fits({"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0}, local=True)
    ray_backend.check_fits(need, {"CPU": 2.0}, local=False)
    ray_backend.check_fits(need, {"CPU": 3.0}, local=True)


def test_without_an_address_the_driver_starts_a_cluster_of_its_own(ray_address: str) -> None:
    """A cluster `ray start` left running on the machine (its address in Ray's temporary directory, here
    this module's cluster): a driver given no address neither joins it nor fails on it (Ray's "num_cpus
    must not be provided" when joining), it starts a private one."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(ray_address)
        script = (
            "import ray\n"
            "from dapo.backends.ray import connect\n"
            "from dapo.config import load_config\n"
            "connect(load_config(None, ['trainer.backend=ray']))\n"
            "print(ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=REPO, env=env
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] != ray_address


def test_an_address_nobody_listens_at_is_a_one_line_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there
    run = subprocess.run(
        [sys.executable, "-m", "dapo", "train", *SHORT, *RAY, f"trainer.ray_address={address}"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dapo: error: cannot join the Ray cluster at {address}: ")
    assert "RAY_AUTH_MODE=token" in lines[0]
