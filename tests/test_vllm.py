"""`VLLMEngine` on the tiny default model (fp32, CPU): it samples what the native engine and the trainer say.

These need vLLM (`make setup-vllm` builds .venv-vllm; `make test-vllm` runs them there); without it they are
skipped. One engine serves the whole module (start-up ~10 s on 2 CPU cores); the end-to-end run has its own.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "vllm", reason="vLLM is not installed in this venv: run `make setup-vllm`, then `make test-vllm`"
)

from dapo.collect import Group, make_train_batch
from dapo.config import ActorConfig, AlgorithmConfig, load_config
from dapo.data.prompts import load_examples_for, tokenize_prompts
from dapo.models import pad_token_id, stop_token_ids
from dapo.models.load import load_policy
from dapo.models.transformer import CausalLM
from dapo.rollout import Completion, NativeEngine, SamplingParams
from dapo.rollout.vllm import VLLMEngine
from dapo.train import Actor

REPO = Path(__file__).resolve().parents[1]
LOGPROB_TOL = 1e-4  # fp32: measured max |vLLM - trainer| ~2e-5 on this model


@pytest.fixture(scope="module")
def policy() -> tuple[CausalLM, list[list[int]], tuple[int, ...], int]:
    """The tiny model in fp32, 16 held-out arithmetic prompts, its stop ids and pad id."""
    cfg = load_config("tiny", ["model.dtype=float32", "model.device=cpu"])
    model, tokenizer, _ = load_policy(cfg.model)
    assert isinstance(model, CausalLM)
    examples = load_examples_for(["arithmetic"], cfg.data, split="eval", dedup=False)[:16]
    prompts = tokenize_prompts(examples, tokenizer, cfg.data.max_prompt_length).prompt_ids
    return model, prompts, stop_token_ids(tokenizer), pad_token_id(tokenizer)


@pytest.fixture(scope="module")
def engine(policy: tuple[CausalLM, list[list[int]], tuple[int, ...], int]) -> Iterator[VLLMEngine]:
    yield VLLMEngine(policy[0], kv_cache_gib=0.5)


def trainer_logprobs(
    model: CausalLM, prompts: list[list[int]], out: list[Completion], temperature: float
) -> list[list[float]]:
    """What the actor computes for these completions (its micro-batched recomputation at the temperature)."""
    by_prompt: dict[int, list[Completion]] = {}
    for c in out:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    groups = [
        Group(i, "t", prompts[i], [c.token_ids for c in cs], [c.logprobs for c in cs], [False] * len(cs),
              [False] * len(cs), [0.0] * len(cs), 0)
        for i, cs in by_prompt.items()
    ]  # fmt: skip
    batch = make_train_batch(groups, pad_token_id=0)
    actor = Actor(model, ActorConfig(micro_batch_size=64), AlgorithmConfig(), temperature=temperature,
                  max_response_length=128)  # fmt: skip
    lp = actor.compute_logprobs(batch)
    cs = [c for g in by_prompt.values() for c in g]
    return [lp[j, : len(c.token_ids)].tolist() for j, c in enumerate(cs)]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    gaps = (
        max((abs(x - y) for x, y in zip(u, v, strict=True)), default=0.0) for u, v in zip(a, b, strict=True)
    )
    return max(gaps)


def test_greedy_equals_the_native_engine_token_for_token(policy, engine) -> None:
    model, prompts, stops, pad = policy
    sp = SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=stops)
    ours, theirs = NativeEngine(model, pad_token_id=pad).generate(prompts, sp), engine.generate(prompts, sp)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    assert [c.finish_reason for c in theirs] == [c.finish_reason for c in ours]
    assert [c.prompt_index for c in theirs] == list(range(len(prompts)))
    # greedy log-probs are at T = 1, as the native engine reports them
    assert max_gap([c.logprobs for c in theirs], [c.logprobs for c in ours]) < LOGPROB_TOL


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, -1), (0.7, 0.9, -1), (1.3, 1.0, 5)])
def test_sampled_logprobs_equal_the_trainers_recomputation(
    policy, engine, temperature: float, top_p: float, top_k: int
) -> None:
    model, prompts, stops, _ = policy
    sp = SamplingParams(n=4, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=64,
                        stop_token_ids=stops, seed=1)  # fmt: skip
    out = engine.generate(prompts, sp)
    assert len(out) == 4 * len(prompts) and [c.prompt_index for c in out] == [i // 4 for i in range(len(out))]
    recomputed = trainer_logprobs(model, prompts, out, temperature)
    assert max_gap([c.logprobs for c in out], recomputed) < LOGPROB_TOL


def test_truncation_changes_samples_not_logprob_definition(policy, engine) -> None:
    """top-k = 2 keeps two tokens: every sampled token is among the two most probable (the sampler truncates)
    and its log-prob is the full softmax's (not renormalised over two, which would be >= log(1/2))."""
    model, prompts, _, _ = policy
    out = engine.generate(prompts[:4], SamplingParams(n=8, temperature=1.5, top_k=2, max_tokens=24, seed=2))
    with torch.no_grad():
        for c in out:
            ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            logits = model(ids)[0, len(prompts[c.prompt_index]) - 1 : -1].float() / 1.5  # [S, V]
            top2 = logits.topk(2, -1).indices  # [S, 2]
            assert all(t in row for t, row in zip(c.token_ids, top2.tolist(), strict=True))
            full = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(c.logprobs), full, atol=LOGPROB_TOL)
    renormalised_floor = torch.log(torch.tensor(0.5)).item()
    assert any(lp < renormalised_floor - 0.05 for c in out for lp in c.logprobs)


def test_stop_ids_max_tokens_and_finish_reasons(policy, engine) -> None:
    _, prompts, stops, _ = policy
    for max_tokens in (64, 6):
        sp = SamplingParams(n=2, temperature=1.0, max_tokens=max_tokens, stop_token_ids=stops, seed=3)
        out = engine.generate(prompts, sp)
        for c in out:
            assert 1 <= len(c.token_ids) <= max_tokens and len(c.logprobs) == len(c.token_ids)
            assert not any(t in stops for t in c.token_ids[:-1])  # nothing after a stop token
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops  # the stop token is part of the response
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == max_tokens
                assert c.token_ids[-1] not in stops
        assert ("stop" if max_tokens == 64 else "length") in {c.finish_reason for c in out}
    # the model's own eos ends nothing unless it is a stop id: without stop ids all run to max_tokens
    out = engine.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=48))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 48 for c in out)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts[:1], SamplingParams(max_tokens=engine.max_model_len))


def test_the_same_seed_gives_the_same_samples(policy, engine) -> None:
    _, prompts, stops, _ = policy
    sp = SamplingParams(n=8, temperature=1.0, max_tokens=64, stop_token_ids=stops, seed=11)
    state = torch.get_rng_state()
    a, b = engine.generate(prompts, sp), engine.generate(prompts, sp)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded call leaves the caller's generator alone
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    other = engine.generate(prompts, SamplingParams(**{**sp.__dict__, "seed": 12}))
    assert [c.token_ids for c in other] != [c.token_ids for c in a]
    # unseeded calls draw their seed from torch's global generator: reproducible from torch.manual_seed
    unseeded = SamplingParams(n=8, temperature=1.0, max_tokens=64, stop_token_ids=stops)
    torch.manual_seed(5)
    c1 = engine.generate(prompts, unseeded)
    torch.manual_seed(5)
    c2 = engine.generate(prompts, unseeded)
    assert [c.token_ids for c in c1] == [c.token_ids for c in c2]


def test_after_a_weight_update_the_engine_samples_from_the_new_weights(policy, engine) -> None:
    model, prompts, stops, _ = policy
    updated = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std())
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=32, stop_token_ids=stops, seed=4)
    version = engine.weights_version
    try:
        before = engine.generate(prompts, sp)
        assert (
            max_gap([c.logprobs for c in before], trainer_logprobs(model, prompts, before, 1.0)) < LOGPROB_TOL
        )
        engine.load_weights(updated.state_dict())
        assert engine.weights_version == version + 1
        after = engine.generate(prompts, sp)
        assert (
            max_gap([c.logprobs for c in after], trainer_logprobs(updated, prompts, after, 1.0)) < LOGPROB_TOL
        )
        assert max_gap([c.logprobs for c in after], trainer_logprobs(model, prompts, after, 1.0)) > 1e-2
    finally:
        engine.load_weights(model.state_dict())  # the module's other tests sample the original weights
    assert engine.weights_version == version + 2


def test_dapo_eval_takes_the_vllm_engine() -> None:
    """`dapo eval rollout.engine=vllm` (its own process): greedy, so its scores equal the native engine's."""
    args = ["eval", "--model", "tiny", "--data", "arithmetic", "--k", "1", "evaluation.max_prompts=24",
            "evaluation.temperature=0", "rollout.max_response_length=48", "model.dtype=float32"]  # fmt: skip
    results = {}
    for engine in ("native", "vllm"):
        run = subprocess.run([sys.executable, "-m", "dapo.cli", *args, f"rollout.engine={engine}"],
                             capture_output=True, text=True, timeout=600, cwd=REPO)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        results[engine] = [line for line in run.stdout.splitlines() if "arithmetic/" in line]
    assert results["vllm"] == results["native"] and any("avg@1" in r for r in results["vllm"])


@pytest.mark.slow
def test_dapo_train_with_vllm_learns_and_stays_on_policy(tmp_path: Path) -> None:
    """`dapo train rollout.engine=vllm`, the tiny preset shortened to 30 steps and evaluated with k = 16 (as
    `test_default_recipe_learns_on_a_short_run`): held-out avg@16 rises by at least 5 points (0.367 -> 0.463
    measured on a Zen 5),
    and the engine's log-probs match the trainer's (mismatch KL < 1e-3) at every step."""
    args = ["rollout.engine=vllm", "trainer.total_steps=30", "evaluation.k=16", "evaluation.every_steps=0",
            "checkpoint.every_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
            f"trainer.output_dir={tmp_path}", "trainer.run_name=vllm"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "dapo.cli", "train", *args], capture_output=True, text=True,
                         timeout=1500, cwd=REPO, env=dict(os.environ))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/arithmetic/avg@16"] for r in rows if "eval/arithmetic/avg@16" in r]
    steps = [r for r in rows if "rollout/mismatch_kl" in r]
    print(f"avg@16 {evals}, max mismatch KL {max(r['rollout/mismatch_kl'] for r in steps):.2e}")
    assert len(evals) == 2, evals
    assert evals[1] - evals[0] >= 0.05, evals
    assert len(steps) >= 27, len(steps)  # an update happened at (nearly) every step
    assert max(r["rollout/mismatch_kl"] for r in steps) < 1e-3
    versions = [r["rollout/weights_version"] for r in steps]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)  # one sync per update


def assert_synced(steps: list[dict[str, float]]) -> None:
    """An engine that samples from the trainer's weights: mismatch KL below the issue's 1e-3 at every step,
    and at the level of float32 rounding (< 1e-6) at the median step. The runs train without dynamic
    sampling, so no step trains groups carried over from the step before (sampled by the weights before the
    last update: 1e-5 to 5e-4 at lr 3e-4); an engine left unsynced drifts to ~1e-3 within steps."""
    kl = sorted(r["rollout/mismatch_kl"] for r in steps)
    print(f"mismatch KL per step, sorted: {', '.join(f'{v:.1e}' for v in kl)}")
    assert kl[-1] < 1e-3 and statistics.median(kl) < 1e-6, kl


@pytest.mark.slow
def test_data_parallel_ranks_each_run_a_synced_vllm_engine(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m dapo train rollout.engine=vllm`: each rank's engine joins the launched
    world (vLLM's external launcher), generates its share, and is synced after every update: the engines'
    log-probs match the sharded trainer's at every step (`assert_synced`; measured 1.5e-9 to 3.1e-9, 2.3e-3
    with rank 1's engine left unsynced at this learning rate)."""
    args = ["rollout.engine=vllm", "trainer.total_steps=4", "trainer.prompts_per_step=16", "actor.lr=3e-4",
            "algorithm.dynamic_sampling=false",
            "evaluation.every_steps=0", "evaluation.before_training=false", "evaluation.max_prompts=16",
            "checkpoint.every_steps=0", "logging.progress_bar=false", "logging.tensorboard=false",
            f"trainer.output_dir={tmp_path}", "trainer.run_name=dp"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "dapo", "train", *args],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=dict(os.environ),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Using external launcher" in run.stdout + run.stderr
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/mismatch_kl" in r]
    assert len(steps) == 4
    assert_synced(steps)
    versions = [r["rollout/weights_version"] for r in steps]
    assert versions == sorted(versions) and len(set(versions)) == len(versions) >= 3  # one sync per update
    assert any("eval/arithmetic/avg@8" in r for r in rows)


@pytest.mark.slow
def test_ray_rollout_workers_run_vllm_engines(tmp_path: Path) -> None:
    """`dapo train trainer.backend=ray rollout.engine=vllm`: a RolloutWorker actor builds its vLLM engine
    (vLLM's own one-process world, beside the weight group) and every broadcast reaches the engine's copy:
    its log-probs match the trainer's at every step (`assert_synced`; without dynamic sampling),
    one weights version per update."""
    pytest.importorskip("ray", reason="Ray is not installed in this venv: run `make setup-vllm` again")
    from tests.test_e2e import SHORT

    args = [*SHORT, "trainer.backend=ray", "rollout.engine=vllm", "rollout.num_workers=1", "actor.lr=3e-4",
            "algorithm.dynamic_sampling=false",
            "evaluation.before_training=false", "logging.progress_bar=false", "logging.tensorboard=false",
            f"trainer.output_dir={tmp_path}", "trainer.run_name=ray"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "dapo.cli", "train", *args], capture_output=True, text=True,
                         timeout=900, cwd=REPO, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/mismatch_kl" in r]
    assert len(steps) >= 3
    assert_synced(steps)
    versions = [r["rollout/weights_version"] for r in steps]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
