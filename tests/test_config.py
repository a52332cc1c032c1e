"""Config tree: defaults are the paper's, presets load, overrides and validation errors name what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dapo.cli import format_plan, main
from dapo.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    field_docs,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_settings() -> None:
    cfg = Config()
    assert (cfg.algorithm.eps_low, cfg.algorithm.eps_high) == (0.2, 0.28)
    assert cfg.algorithm.dual_clip_c == 10.0
    assert cfg.algorithm.loss_aggregation == "token-mean"
    assert cfg.algorithm.dynamic_sampling and cfg.algorithm.max_rounds == 10
    assert cfg.rollout.n == 16 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.rollout.max_response_length == 20480 and cfg.reward.overlong_cache_length == 4096
    assert cfg.trainer.prompts_per_step == 512 and cfg.actor.mini_batch_size == 512
    assert (cfg.actor.lr, cfg.actor.weight_decay, cfg.actor.grad_clip, cfg.actor.warmup_steps) == (
        1e-6,
        0.1,
        1.0,
        20,
    )
    assert (cfg.evaluation.k, cfg.evaluation.temperature, cfg.evaluation.top_p) == (32, 1.0, 0.7)
    cfg.validate()


def test_every_field_is_documented() -> None:
    import dataclasses

    cfg = Config()
    for section in dataclasses.fields(cfg):
        cls = type(getattr(cfg, section.name))
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(field_docs(cls)), f"undocumented fields in {section.name}"


def test_paper_preset_encodes_the_paper_run() -> None:
    cfg = load_config(REPO / "configs" / "dapo_qwen2.5_32b.yaml")
    assert cfg.trainer.prompts_per_step == 512 and cfg.rollout.n == 16
    assert cfg.actor.mini_batch_size == 512 and cfg.actor.epochs == 1
    assert cfg.rollout.max_response_length == 20480 and cfg.reward.overlong_cache_length == 4096
    assert cfg.data.max_prompt_length == 2048 and cfg.actor.lr == 1e-6 and cfg.actor.warmup_steps == 20
    assert cfg.evaluation.top_p == 0.7 and cfg.evaluation.k == 32
    # 512 prompts x 16 responses / 512 per mini-batch = 16 gradient updates per step, as the paper says
    assert "gradient updates per step         16" in format_plan(cfg)


def test_all_presets_load_and_round_trip(tmp_path: Path) -> None:
    import yaml

    for preset in sorted(PRESETS_DIR.glob("*.yaml")):
        cfg = load_config(preset)
        out = tmp_path / preset.name
        out.write_text(dump_config(cfg))
        assert config_from_dict(yaml.safe_load(out.read_text())) == cfg, preset.name


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny", ["actor.lr=2e-6", "rollout.n=4", "algorithm.dual_clip_c=null", "actor.betas=[0.8,0.9]"]
    )
    assert cfg.actor.lr == 2e-6 and isinstance(cfg.actor.lr, float)
    assert cfg.rollout.n == 4 and cfg.algorithm.dual_clip_c is None and cfg.actor.betas == (0.8, 0.9)
    assert parse_override("data.train_files=a.parquet") == ("data.train_files", "a.parquet")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("actor.lrr=1", "unknown key 'actor.lrr' (did you mean 'lr'?)"),
        ("actr.lr=1", "unknown key 'actr' (did you mean 'actor'?)"),
        (
            "rollout.engine=vlm",
            "rollout.engine: invalid value 'vlm'; allowed: 'native', 'hf', 'vllm' (did you mean",
        ),
        ("actor.lr=abc", "actor.lr: expected a number, got 'abc'"),
        ("rollout.n=0", "rollout.n: invalid value 0; allowed: an integer >= 1"),
        ("rollout.top_p=1.5", "rollout.top_p: invalid value 1.5"),
        ("algorithm.dual_clip_c=0.5", "algorithm.dual_clip_c: invalid value 0.5; allowed: a number > 1"),
        ("rollout.n=2.5", "rollout.n: expected an integer, got 2.5"),
        ("actor.mini_batch_size=100000", "actor.mini_batch_size: invalid value 100000"),
        ("reward.overlong_cache_length=1000", "reward.overlong_cache_length: invalid value 1000"),
        ("lr", "expected the form key.path=value"),
        ("rollout.engine=hf", "'hf' only with model.implementation=hf"),
        ("actor.precision=fp16", "actor.precision: invalid value 'fp16'; allowed: 'model', 'bf16-mixed'"),
    ],
)
def test_validation_errors_name_key_value_and_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)


def test_bf16_mixed_needs_float32_masters_and_the_native_engine() -> None:
    assert load_config("tiny", ["actor.precision=bf16-mixed"]).actor.precision == "bf16-mixed"
    for override, got in (("model.dtype=bfloat16", "got bfloat16"), ("rollout.engine=vllm", "got vllm")):
        with pytest.raises(ConfigError) as err:
            load_config("tiny", ["actor.precision=bf16-mixed", override])
        assert "actor.precision: invalid value 'bf16-mixed'; allowed: 'bf16-mixed' only" in str(err.value)
        assert got in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("tinny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(wrong)


def test_cli_dry_run_prints_config_and_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(REPO / "configs" / "dapo_qwen2.5_32b.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "eps_high: 0.28" in out
    assert "responses trained per step        N x G = 8192" in out
    assert "linear over 20 steps" in out


def test_the_papers_run_on_a_ray_cluster_dry_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/dapo_qwen2.5_32b_ray.yaml: the paper's algorithm, laid out on 16 nodes x 8 GPUs."""
    assert main(["train", "--config", str(REPO / "configs" / "dapo_qwen2.5_32b_ray.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "backend: ray" in out and "eps_high: 0.28" in out
    assert "trainer ranks                     64 x (8 CPU, 1 GPU)" in out
    assert "rollout workers                   16 x (8 CPU, 4 GPU), on resources of their own" in out
    assert "cluster resources asked           640 CPU, 128 GPU" in out
    # The trainer ranks only train: no engine or KV cache in their estimate; the workers' is per GPU of four.
    ranks = out[out.index("per trainer rank (64 ranks") : out.index("Ray layout")]
    assert "KV cache" not in ranks and "engine" not in ranks and "prompts generated" not in ranks
    assert "worker memory (per GPU, GiB)     weights 15.26 + KV cache" in out and "4 GPUs per worker" in out
    assert "to each worker (NCCL broadcast group)" in out  # every member has GPUs of its own


def test_ray_keys_are_validated() -> None:
    bad = {
        "trainer.backend=slurm": "trainer.backend: invalid value 'slurm'; allowed: 'local', 'ray'",
        "rollout.num_workers=0": "rollout.num_workers: invalid value 0; allowed: an integer >= 1",
        "trainer.ray_cpus_per_actor=0": "trainer.ray_cpus_per_actor: invalid value 0",
        "rollout.colocate=3": "rollout.colocate: expected true or false",
        "trainer.async_rollout_steps=2": "trainer.async_rollout_steps: invalid value 2; allowed: 0 or 1",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
    needs = {
        "trainer.backend=local": "0 unless trainer.backend=ray",
        "algorithm.rollout_is_cap=null": "0 unless algorithm.rollout_is_cap is set",
        "algorithm.use_rollout_logprobs=true": "0 with algorithm.use_rollout_logprobs=true",
    }
    ok = ["trainer.backend=ray", "algorithm.rollout_is_cap=2.0", "trainer.async_rollout_steps=1"]
    assert load_config(None, ok).trainer.async_rollout_steps == 1
    for override, message in needs.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [*ok, override])


def test_a_batchs_scoring_deadline_stays_below_the_collective_timeout() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("reward.batch_timeout_s: invalid value 600.0; allowed: 0 or <")
    ):
        load_config(None, ["reward.batch_timeout_s=600"])
    assert load_config(None, ["reward.batch_timeout_s=100"]).reward.batch_timeout_s == 100


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--dry-run", "actor.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_cli_help_explains_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "dapo train" in out and "dapo eval" in out and "--dry-run" in out


def test_ablation_ladder_differs_only_in_settings() -> None:
    import dataclasses
    import itertools

    ladder = [load_config(REPO / "configs" / f"ablation_{i}.yaml") for i in (
        "1_naive_grpo", "2_overlong_filtering", "3_clip_higher", "4_soft_overlong_punishment",
        "5_token_level_loss", "6_dynamic_sampling",
    )]  # fmt: skip
    paper = load_config(REPO / "configs" / "dapo_qwen2.5_32b.yaml")
    for cfg in ladder:  # everything but the algorithm switches is the paper's run
        for section in ("model", "data", "rollout", "actor", "trainer", "evaluation"):
            assert getattr(cfg, section) == getattr(paper, section), section
    steps = [
        (a, b) for prev, cfg in itertools.pairwise(ladder)
        for a, b in [(dataclasses.asdict(prev), dataclasses.asdict(cfg))]
    ]  # fmt: skip

    def changed(a: dict, b: dict) -> set[str]:
        return {f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]}

    assert [changed(a, b) for a, b in steps] == [
        {"algorithm.overlong_filter"},
        {"algorithm.eps_high"},
        {"reward.soft_overlong_punishment"},
        {"algorithm.loss_aggregation"},
        {"algorithm.dynamic_sampling"},
    ]
    naive = ladder[0]
    assert naive.algorithm.eps_low == naive.algorithm.eps_high and not naive.algorithm.dynamic_sampling


def test_base_chain_loop_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["train", "--dry-run", *args]) == 0
    return capsys.readouterr().out


def planned(out: str, line: str) -> float:
    """The GiB figure of a dry-run memory line."""
    return float(out[out.index(line) :].splitlines()[0].split()[-1])


def test_the_7b_preset_fits_8_gpus_of_80_gib(capsys: pytest.CaptureFixture[str]) -> None:
    out = dry_run(capsys, "--config", str(REPO / "configs" / "dapo_qwen2.5_7b_8gpu.yaml"))
    assert "FITS in trainer.gpu_memory_gib=80" in out and "DOES NOT FIT" not in out
    assert "activations (checkpointed)" in out and "logits (chunks of 1024)" in out
    assert "<= 73 sequences of 10240 tokens at once" in out
    # without the memory settings the same run does not fit: activations and logits of a 16k-token micro-batch
    off = dry_run(
        capsys,
        "--config",
        str(REPO / "configs" / "dapo_qwen2.5_7b_8gpu.yaml"),
        "actor.activation_checkpointing=false",
        "actor.logits_chunk_tokens=0",
    )
    assert "DOES NOT FIT" in off
    assert planned(off, "activations ") > 5 * planned(out, "activations (checkpointed)")


def test_the_32b_preset_fits_128_colocated_gpus_by_the_hand_off(capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun, 128 ranks, vLLM on each rank's own GPU: generation (vLLM's 61 GiB of weights and 12 GiB of
    KV cache) and the update take turns on the device; without the hand-off the update runs beside vLLM."""
    preset = str(REPO / "configs" / "dapo_qwen2.5_32b.yaml")
    out = dry_run(capsys, "--config", preset)
    assert "FITS in trainer.gpu_memory_gib=80: peak 75.3 GiB (generation)" in out
    assert planned(out, "total (update)") < 40 and planned(out, "total (generation)") < 80
    assert "<= 2 sequences of 22528 tokens at once" in out
    kept = dry_run(capsys, "--config", preset, "rollout.handoff=false", "actor.offload=none")
    assert "DOES NOT FIT in trainer.gpu_memory_gib=80" in kept and "(update)" in kept
    assert planned(kept, "total (update)") > planned(out, "total (update)") + 61 + 12
    short = dry_run(capsys, "--config", preset, "rollout.vllm.kv_cache_gib=2")
    assert "holds no sequence of 22528 tokens" in short and "DOES NOT FIT" in short


def test_the_32b_ray_preset_fits_trainer_ranks_and_rollout_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The paper's settings on 64 trainer ranks and 16 TP-4 vLLM workers, 80 GiB each: the update under 40
    GiB; rank 0's full copy in host memory, the sync a bucket at a time; ~29 sequences per worker."""
    out = dry_run(capsys, "--config", str(REPO / "configs" / "dapo_qwen2.5_32b_ray.yaml"))
    ranks = out[out.index("per trainer rank") : out.index("Ray layout")]
    assert planned(ranks, "total (update)") < 40 and planned(ranks, "loading (before training)") < 4
    assert "trainer ranks: FITS in trainer.gpu_memory_gib=80" in ranks
    assert planned(ranks, "host memory (not on the device)") > 60  # rank 0's full copy
    assert "rollout workers: FITS in trainer.gpu_memory_gib=80" in out
    assert "<= 29 sequences of 22528 tokens at once" in out and "DOES NOT FIT" not in out
    ray_preset = str(REPO / "configs" / "dapo_qwen2.5_32b_ray.yaml")
    tight = dry_run(capsys, "--config", ray_preset, "rollout.vllm.kv_cache_gib=70")
    assert "rollout workers: DOES NOT FIT in trainer.gpu_memory_gib=80" in tight


H200_PEAKS_GIB = {  # torch.cuda.max_memory_allocated, scripts/gpu_check.py on an H200 (docs/benchmarks.md)
    ("qwen2.5-1.5b", 1024, 15360, "none"): ({}, 92.95),
    ("qwen2.5-1.5b", 1024, 15360, "checkpointing"): ({"activation_checkpointing": True}, 48.46),
    ("qwen2.5-1.5b", 1024, 15360, "chunked"): ({"logits_chunk_tokens": 2048}, 83.63),
    ("qwen2.5-1.5b", 1024, 15360, "both"): (
        {"activation_checkpointing": True, "logits_chunk_tokens": 2048},
        39.13,
    ),
    ("qwen2.5-0.5b", 2048, 30720, "none"): ({}, 90.53),
    ("qwen2.5-0.5b", 2048, 30720, "checkpointing"): ({"activation_checkpointing": True}, 48.27),
    ("qwen2.5-0.5b", 2048, 30720, "chunked"): ({"logits_chunk_tokens": 2048}, 60.27),
    ("qwen2.5-0.5b", 2048, 30720, "both"): (
        {"activation_checkpointing": True, "logits_chunk_tokens": 2048},
        18.02,
    ),
}


@pytest.mark.parametrize("case", list(H200_PEAKS_GIB), ids=lambda c: "-".join(map(str, c)))
def test_the_planner_holds_to_the_measured_gpu_peak(case: tuple[str, int, int, str]) -> None:
    """One response, bf16-mixed, one GPU. The coefficients were fitted to the 1.5B rows (within 5%); the 0.5B
    rows at twice the length are held out: within 15%, but for both settings together, over by 21% (the
    estimate errs towards DOES NOT FIT)."""
    from dapo.config import ActorConfig
    from dapo.plan import model_shape, rank_memory

    shape, prompt, response, _ = case
    settings, measured = H200_PEAKS_GIB[case]
    args, _ = model_shape(shape)
    assert args is not None
    cfg = load_config(None, ["model.dtype=float32", f"data.max_prompt_length={prompt}"])
    cfg.rollout.max_response_length = response
    cfg.actor = ActorConfig(mini_batch_size=1, micro_batch_size=1, precision="bf16-mixed", **settings)
    ratio = rank_memory(cfg, args, 1, cuda=True, generates=False).update / 2**30 / measured
    low, high = (0.95, 1.05) if shape == "qwen2.5-1.5b" else (0.85, 1.15 if case[3] != "both" else 1.25)
    assert low <= ratio <= high, ratio


def test_objective_presets_and_a_misspelt_estimator() -> None:
    assert load_config("rloo", []).algorithm.advantage == "rloo"
    dr = load_config("dr_grpo", []).algorithm
    assert (dr.advantage_std_normalize, dr.loss_aggregation, dr.eps_high) == (
        False,
        "seq-mean-token-sum-norm",
        0.2,
    )
    assert load_config("cispo", []).algorithm.policy_loss == "cispo"
    assert load_config("gspo", []).algorithm.ratio_level == "sequence"
    with pytest.raises(
        ConfigError, match=re.escape("algorithm.dual_clip_c: invalid value 10.0; allowed: null with cispo")
    ):
        load_config(None, ["algorithm.policy_loss=cispo"])
    allowed = "allowed: 'grpo', 'rloo', 'reinforce_plus_plus'"
    with pytest.raises(ConfigError, match=re.escape(f"algorithm.advantage: invalid value 'ppo'; {allowed}")):
        load_config(None, ["algorithm.advantage=ppo"])
