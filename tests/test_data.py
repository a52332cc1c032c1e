"""Tests for dapo.data: the DAPO template, the readers (real data and malformed files), the sampler."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dapo.data import (
    DAPO_TEMPLATE,
    DataError,
    DataWarning,
    Example,
    PromptSampler,
    ReaderSettings,
    apply_dapo_template,
    is_templated,
    load_examples,
    load_many,
    strip_dapo_template,
)
from dapo.data.dataset import Message, prompt_uid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AIME = DATA / "aime-2024.parquet"
DAPO17K = DATA / "dapo-math-17k-dedup.parquet"
PREFIX = "Solve the following math problem step by step."


def _need(path: Path) -> Path:
    """Skip the test when the shared data file is not there (it is never committed into the repo)."""
    if not path.is_file():
        pytest.skip(f"shared data file {path} not found (expected beside the repository)")
    return path


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(problem: Any, answer: Any) -> str:
    """One reference-schema row as a JSON line."""
    return json.dumps({"prompt": problem, "reward_model": {"ground_truth": answer}, "data_source": "t"})


def _data_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


# ------------------------------------------------------------------------------------------------ templates


def test_template_text_and_application() -> None:
    problem = r"Compute $\frac{1}{2} + {x}$."
    text = apply_dapo_template(problem)
    assert text == DAPO_TEMPLATE.replace("{problem}", problem)  # braces in the problem survive
    assert text.startswith(PREFIX + " The last line of your response should be of the form Answer: $Answer")
    assert text.endswith('\n\nRemember to put your answer on its own line after "Answer:".')
    assert is_templated(text)
    assert not is_templated(problem)
    # A bare problem that happens to start like an instruction is not templated.
    assert not is_templated("Solve the equation $x + 1 = 2$.")
    assert strip_dapo_template(text) == problem
    with pytest.raises(ValueError, match="not a DAPO-templated prompt"):
        strip_dapo_template(problem)


def test_template_reproduces_aime_prompts_exactly() -> None:
    table = pq.read_table(_need(AIME), columns=["prompt", "extra_info"]).to_pylist()
    assert len(table) == 960
    for row in table:
        content = row["prompt"][0]["content"]
        problem = strip_dapo_template(content)
        assert problem == row["extra_info"]["raw_problem"]
        assert apply_dapo_template(problem) == content


# ----------------------------------------------------------------------------------------------- real data


def test_aime_without_dedup_keeps_all_960_rows() -> None:
    data = load_examples(_need(AIME), ReaderSettings(dedup=False))
    assert len(data) == data.num_rows == 960
    assert data.num_duplicates == data.num_skipped == 0
    uids: dict[str, int] = {}
    for example in data.examples:
        uids[example.uid] = uids.get(example.uid, 0) + 1
        # Already templated in the file: the template must not be applied a second time.
        assert example.prompt_text.count(PREFIX) == 1
        assert is_templated(example.prompt_text)
        assert example.answer.isdigit()
        assert example.data_source == "math_dapo"
        assert example.messages[0].role == "user"
    assert sorted(set(uids.values())) == [32]  # 30 problems, 32 copies each, copies share a uid
    assert len(uids) == 30
    assert [e.row for e in data.examples] == list(range(960))


def test_aime_dedup_keeps_30_problems() -> None:
    data = load_examples(_need(AIME))
    assert len(data) == 30
    assert data.num_duplicates == 930
    assert data.num_conflicts == 0
    assert len({e.uid for e in data.examples}) == 30


def test_dapo17k_loads_fully_with_template_applied() -> None:
    path = _need(DAPO17K)
    start = time.perf_counter()
    data = load_examples(path, ReaderSettings(dedup=False))
    elapsed = time.perf_counter() - start
    print(f"loaded {len(data)} examples from {path.name} in {elapsed:.2f} s")
    assert len(data) == 17_917
    assert data.num_skipped == 0
    raw = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    for example, prompt in zip(data.examples, raw, strict=True):
        assert example.prompt_text.startswith(PREFIX)
        assert strip_dapo_template(example.prompt_text) == prompt[0]["content"]
        assert example.answer.lstrip("-").isdigit()
    assert elapsed < 10.0  # about 0.5 s here; the brief asks for well under 2 s


def test_dapo17k_dedup_drops_repeats_and_reports_conflicts() -> None:
    # The "dedup" copy still holds 627 repeated prompts, 11 of them with a different answer.
    with pytest.warns(DataWarning) as record:
        data = load_examples(_need(DAPO17K))
    messages = _data_warnings(list(record))
    assert len(messages) == 1
    assert "11 duplicate prompt(s) with a different answer" in messages[0]
    assert "row 179 (0-based) repeats the prompt of" in messages[0]
    assert len(data) == 17_290
    assert data.num_duplicates == 627
    assert data.num_conflicts == 11
    assert len({e.uid for e in data.examples}) == len(data)


# ------------------------------------------------------------------------------------------ malformed files


def _malformed_jsonl(tmp_path: Path) -> Path:
    return _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            _row("What is 1+1?", "2"),  # row 0: good
            json.dumps({"prompt": "What is 2+2?", "data_source": "t"}),  # row 1: no reward_model
            _row("   ", "3"),  # row 2: empty prompt
            _row(42, "4"),  # row 3: prompt of the wrong type
            '{"prompt": "broken", ',  # row 4: bad JSON
            "",  # blank line: not a row
            _row("What is 3+3?", 6),  # row 6: int answer, fine
            _row("What is 1/2?", 0.5),  # row 7: non-integral float answer
            _row([{"role": "robot", "content": "hi"}], "1"),  # row 8: unknown role
            _row("What is 4+4?", None),  # row 9: null answer
        ],
    )


def test_jsonl_bad_rows_are_skipped_counted_and_warned_once(tmp_path: Path) -> None:
    path = _malformed_jsonl(tmp_path)
    with pytest.warns(DataWarning) as record:
        data = load_examples(path)
    messages = _data_warnings(list(record))
    assert len(messages) == 1
    assert str(path) in messages[0]
    assert "skipped 7 of 9 rows" in messages[0]
    assert "row 1 (0-based, line 2)" in messages[0]
    assert "missing key 'reward_model.ground_truth'" in messages[0]
    assert [e.row for e in data.examples] == [0, 6]
    assert data.examples[1].answer == "6"
    assert data.num_rows == 9
    assert data.num_skipped == 7
    rows = [row for row, _ in data.skipped]
    assert rows == [1, 2, 3, 4, 7, 8, 9]
    reasons = dict(data.skipped)
    assert "empty string" in reasons[2]
    assert "has type int" in reasons[3]
    assert "bad JSON line" in reasons[4]
    assert "non-integral float" in reasons[7]
    assert "'robot'" in reasons[8] and "system, user, assistant" in reasons[8]
    assert "is null" in reasons[9]
    assert all(reason.startswith(str(path)) for _, reason in data.skipped)


def test_jsonl_strict_raises_naming_file_and_row(tmp_path: Path) -> None:
    path = _malformed_jsonl(tmp_path)
    with pytest.raises(DataError, match=r"row 1 \(0-based, line 2\): missing key") as info:
        load_examples(path, ReaderSettings(strict=True))
    assert str(path) in str(info.value)


def test_bad_json_line_strict(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "b.jsonl", [_row("q", "1"), "not json"])
    with pytest.raises(DataError, match=r"b\.jsonl: row 1 \(0-based, line 2\): bad JSON line"):
        load_examples(path, ReaderSettings(strict=True))


def test_a_deeply_nested_row_is_a_bad_row(tmp_path: Path) -> None:
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"  # parsing it recurses past Python's limit
    path = _write_jsonl(tmp_path / "deep.jsonl", [_row("q", "1"), deep, _row("r", "2")])
    skipped = r"deep\.jsonl: skipped 1 of 3 rows; first: row 1 \(0-based, line 2\)"
    with pytest.warns(DataWarning, match=skipped):
        data = load_examples(path)
    assert [e.row for e in data.examples] == [0, 2]
    assert "bad JSON line: nested too deeply" in dict(data.skipped)[1]
    with pytest.raises(DataError, match=r"deep\.jsonl: row 1 \(0-based, line 2\): bad JSON line"):
        load_examples(path, ReaderSettings(strict=True))
    array = tmp_path / "deep.json"  # a .json file holding one array: the whole file is unreadable
    array.write_text("[" + deep + "]")
    with pytest.raises(DataError, match=r"deep\.json: not valid JSON: nested too deeply"):
        load_examples(array)


def _malformed_parquet(tmp_path: Path) -> Path:
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    table = pa.table(
        {
            "prompt": pa.array(
                [
                    [{"content": "What is 1+1?", "role": "user"}],  # row 0: good
                    [],  # row 1: empty message list
                    None,  # row 2: null prompt
                    [{"content": "What is 2+2?", "role": "user"}],  # row 3: null answer struct
                    [{"content": "", "role": "user"}],  # row 4: empty content
                    [{"content": "What is 5+5?", "role": "user"}],  # row 5: good
                ],
                type=pa.list_(message),
            ),
            "reward_model": pa.array(
                [
                    {"ground_truth": "2"},
                    {"ground_truth": "1"},
                    {"ground_truth": "1"},
                    None,
                    {"ground_truth": "1"},
                    {"ground_truth": "10"},
                ],
                type=pa.struct([("ground_truth", pa.string())]),
            ),
        }
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_bad_rows_skipped_and_strict(tmp_path: Path) -> None:
    path = _malformed_parquet(tmp_path)
    with pytest.warns(DataWarning) as record:
        data = load_examples(path)
    messages = _data_warnings(list(record))
    assert len(messages) == 1
    assert (
        str(path) in messages[0] and "row 1 (0-based)" in messages[0] and "empty message list" in messages[0]
    )
    assert [e.row for e in data.examples] == [0, 5]
    assert [row for row, _ in data.skipped] == [1, 2, 3, 4]
    # No data_source column: the file stem stands in.
    assert {e.data_source for e in data.examples} == {"bad"}
    with pytest.raises(
        DataError, match=r"bad\.parquet: row 1 \(0-based\): 'prompt' is an empty message list"
    ):
        load_examples(path, ReaderSettings(strict=True))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.parquet: no such file"):
        load_examples(tmp_path / "nope.parquet")
    txt = tmp_path / "data.csv"
    txt.write_text("prompt,answer\n")
    with pytest.raises(
        DataError, match=r"data\.csv: unknown file extension '\.csv'; allowed: \.parquet, \.jsonl"
    ):
        load_examples(txt)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: cannot read parquet file"):
        load_examples(corrupt)
    # Every row bad: nothing to train on is an error even when not strict.
    allbad = _write_jsonl(tmp_path / "allbad.jsonl", [_row("", "1")])
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no usable examples.*empty string"):
        load_examples(allbad)


def test_wrong_column_names_suggest_the_right_one(tmp_path: Path) -> None:
    parquet = _malformed_parquet(tmp_path)
    with pytest.raises(DataError, match=r"key 'promt' not found; columns: .*did you mean 'prompt'\?"):
        load_examples(parquet, ReaderSettings(prompt_key="promt"))
    with pytest.raises(DataError, match=r"'ground_truh' is missing.*did you mean 'ground_truth'\?"):
        load_examples(parquet, ReaderSettings(answer_key="reward_model.ground_truh"))
    jsonl = _write_jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "q", "answer": "1"})])
    with pytest.raises(DataError, match=r"q\.jsonl: key 'questoin' not found.*did you mean 'question'\?"):
        load_examples(jsonl, ReaderSettings(prompt_key="questoin", answer_key="answer"))
    nested = _write_jsonl(tmp_path / "n.jsonl", [json.dumps({"q": "x", "meta": {"solution": "1"}})])
    with pytest.raises(DataError, match=r"'soluton' is missing\); keys of 'meta'.*did you mean 'solution'\?"):
        load_examples(nested, ReaderSettings(prompt_key="q", answer_key="meta.soluton"))


# ---------------------------------------------------------------------------------------- configurable keys


def test_plain_jsonl_with_configurable_and_nested_keys(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "plain.jsonl",
        [
            json.dumps(
                {"question": "What is 2+3?", "answer": 5, "meta": {"src": "gsm", "sol": {"final": "5"}}}
            ),
            json.dumps(
                {"question": "What is 2*3?", "answer": 6.0, "meta": {"src": "", "sol": {"final": "6"}}}
            ),
        ],
    )
    data = load_examples(path, ReaderSettings(prompt_key="question", answer_key="answer"))
    assert [e.answer for e in data.examples] == ["5", "6"]  # int and integral float become strings
    assert [e.data_source for e in data.examples] == ["plain", "plain"]  # no data_source key: file stem
    assert data.examples[0].prompt_text == apply_dapo_template("What is 2+3?")
    assert data.examples[0].chat_messages() == [{"role": "user", "content": data.examples[0].prompt_text}]
    nested = load_examples(
        path, ReaderSettings(prompt_key="question", answer_key="meta.sol.final", data_source_key="meta.src")
    )
    assert [e.answer for e in nested.examples] == ["5", "6"]
    assert [e.data_source for e in nested.examples] == ["gsm", "plain"]  # empty value: file stem
    # A key that itself contains a dot is looked up as is before descending.
    dotted = _write_jsonl(
        tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "reward_model.ground_truth": "7"})]
    )
    assert load_examples(dotted).examples[0].answer == "7"


def test_json_array_file_and_max_rows(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(
        json.dumps([{"prompt": f"q{i}", "reward_model": {"ground_truth": str(i)}} for i in range(5)])
    )
    data = load_examples(path)
    assert [e.answer for e in data.examples] == ["0", "1", "2", "3", "4"]
    assert len(load_examples(path, ReaderSettings(max_rows=2))) == 2
    lines = _write_jsonl(tmp_path / "l.jsonl", [_row(f"q{i}", str(i)) for i in range(5)])
    limited = load_examples(lines, ReaderSettings(max_rows=3))
    assert len(limited) == limited.num_rows == 3


def test_apply_template_modes(tmp_path: Path) -> None:
    templated = apply_dapo_template("What is 1+1?")
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            _row("What is 2+2?", "4"),
            _row([{"role": "system", "content": "Be brief."}, {"role": "user", "content": templated}], "2"),
        ],
    )
    auto = load_examples(path).examples
    assert auto[0].prompt_text == apply_dapo_template("What is 2+2?")
    assert auto[1].prompt_text == templated  # already templated: left alone
    assert auto[1].messages[0] == Message("system", "Be brief.")
    never = load_examples(path, ReaderSettings(apply_template="never")).examples
    assert never[0].prompt_text == "What is 2+2?"
    always = load_examples(path, ReaderSettings(apply_template="always")).examples
    assert always[1].prompt_text.count(PREFIX) == 2


def test_reader_settings_validation() -> None:
    with pytest.raises(ValueError, match=r"apply_template='sometimes'.*'auto', 'always', 'never'"):
        ReaderSettings(apply_template="sometimes")
    with pytest.raises(ValueError, match=r"max_rows=0"):
        ReaderSettings(max_rows=0)
    with pytest.raises(ValueError, match=r"answer_key='reward_model\.'"):
        ReaderSettings(answer_key="reward_model.")


def test_load_many_dedups_across_files_and_warns_on_conflicts(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [_row("q1", "1"), _row("q2", "2")])
    b = _write_jsonl(tmp_path / "b.jsonl", [_row("q2", "2"), _row("q1", "9"), _row("q3", "3")])
    with pytest.warns(
        DataWarning, match=r"b\.jsonl: row 1 \(0-based\) repeats the prompt of .*a\.jsonl: row 0"
    ):
        data = load_many([a, b])
    assert [(Path(e.source).name, e.row) for e in data.examples] == [
        ("a.jsonl", 0),
        ("a.jsonl", 1),
        ("b.jsonl", 2),
    ]
    assert data.num_duplicates == 2
    assert data.num_conflicts == 1
    assert data.num_rows == 5
    assert data.sources == [str(a), str(b)]
    with pytest.raises(DataError, match="conflicting duplicate"):
        load_many([a, b], ReaderSettings(strict=True))
    assert len(load_many([a, b], ReaderSettings(dedup=False))) == 5
    with pytest.raises(TypeError, match="list of paths"):
        load_many(str(a))


def test_uid_is_a_function_of_the_messages() -> None:
    one = (Message("user", "x"),)
    assert prompt_uid(one) == prompt_uid((Message("user", "x"),))
    assert prompt_uid(one) != prompt_uid((Message("user", "y"),))
    assert prompt_uid(one) != prompt_uid((Message("system", "x"),))
    example = Example(prompt_uid(one), one, "1", "t", "mem", 0)
    assert example.prompt_text == "x"


# -------------------------------------------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations_independent_of_batch_size() -> None:
    a = PromptSampler(10, seed=3)
    b = PromptSampler(10, seed=3)
    seq_a = [i for _ in range(10) for i in a.next_indices(3)]  # 30 draws, batches span epoch boundaries
    seq_b = [i for _ in range(6) for i in b.next_indices(5)]
    assert seq_a == seq_b
    epochs = [seq_a[0:10], seq_a[10:20], seq_a[20:30]]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(10))
        assert order == a.epoch_order(e)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert PromptSampler(10, seed=4).next_indices(10) != epochs[0]
    assert a.epoch == 3 and a.position == 0
    assert PromptSampler(5, seed=0, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize(("k", "batch", "m"), [(2, 3, 4), (3, 4, 5), (0, 7, 3), (5, 1, 9)])
def test_sampler_resume_continues_exactly(k: int, batch: int, m: int) -> None:
    original = PromptSampler(7, seed=11)
    for _ in range(k):
        original.next_indices(batch)
    state = original.state_dict()
    expected = [original.next_indices(batch) for _ in range(m)]
    restored = PromptSampler(7, seed=11)
    restored.load_state_dict(dict(state))
    assert [restored.next_indices(batch) for _ in range(m)] == expected
    assert restored.state_dict() == original.state_dict()


def test_sampler_max_epochs_exhausts() -> None:
    sampler = PromptSampler(4, seed=0, max_epochs=2)
    assert len(sampler.next_indices(3)) == 3
    assert len(sampler.next_indices(3)) == 3
    assert not sampler.exhausted
    assert len(sampler.next_indices(3)) == 2  # only 8 in two epochs
    assert sampler.exhausted
    assert sampler.next_indices(3) == []
    assert sampler.epoch == 2


def test_sampler_rejects_bad_input_and_foreign_state() -> None:
    with pytest.raises(ValueError, match="num_examples=0"):
        PromptSampler(0, seed=0)
    with pytest.raises(ValueError, match="max_epochs=0"):
        PromptSampler(3, seed=0, max_epochs=0)
    sampler = PromptSampler(5, seed=1)
    with pytest.raises(ValueError, match="n=-1"):
        sampler.next_indices(-1)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['position'\]"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match="unknown keys"):
        sampler.load_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match="num_examples=6 but this sampler has num_examples=5"):
        sampler.load_state_dict({**state, "num_examples": 6})
    with pytest.raises(ValueError, match="seed=2 but this sampler has seed=1"):
        sampler.load_state_dict({**state, "seed": 2})
    with pytest.raises(ValueError, match="position=5"):
        sampler.load_state_dict({**state, "position": 5})
