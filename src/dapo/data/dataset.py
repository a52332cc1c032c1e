"""Dataset readers: the reference parquet schema and plain jsonl, with row validation and deduplication.

Formats: `.parquet` (read with pyarrow, only the needed columns), `.jsonl` (one JSON object per line), `.json`
(one object per line, or a single JSON array of objects). The prompt column holds either a list of chat
messages (`[{"role": "user", "content": ...}]`, the reference schema) or a bare problem string; the answer is
found by a dotted path into nested structs (`reward_model.ground_truth`).

Row numbers are 0-based everywhere (`Example.row`, `LoadedDataset.skipped`, every message). In line-oriented
files they count physical lines, blank lines included, so row N is line N + 1, and messages say both.

Bad rows (missing or null values, wrong types, bad JSON lines) are skipped, counted and reported in one
warning per file; with `strict=True` the first one raises `DataError`. Problems with a file as a whole
(missing or unreadable, unknown extension, a key absent from every row, no usable row at all) always raise
`DataError`.

Deduplication (on by default) keeps the first occurrence of each prompt, compared after templating: the
published DAPO-Math-17k parquet repeats each prompt about 100 times, and rows sharing a prompt would put it
into one batch twice. Evaluation turns it off: AIME 2024 repeats each problem 32 times on purpose.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dapo.data.templates import apply_dapo_template, is_templated
from dapo.errors import UserError

ALLOWED_EXTENSIONS = (".parquet", ".jsonl", ".json")
"""File extensions `load_examples` reads."""
APPLY_TEMPLATE_CHOICES = ("auto", "always", "never")
"""Allowed values of `ReaderSettings.apply_template`."""
ALLOWED_ROLES = ("system", "user", "assistant")
"""Chat roles accepted in a prompt's message list."""
MAX_SKIPPED_RECORDED = 1000
"""`LoadedDataset.skipped` keeps at most this many entries (`num_skipped` always counts all)."""


class DataError(UserError, ValueError):
    """A data file or row is unusable; the message names the file, the row (0-based) and the key or reason."""


class DataWarning(UserWarning):
    """Rows were skipped, or duplicates disagree on the answer; loading went on."""


@dataclass(frozen=True)
class Message:
    """One chat message of a prompt."""

    role: str
    """"system", "user" or "assistant"."""
    content: str
    """The message text."""


def prompt_uid(messages: Sequence[Message]) -> str:
    """Stable id of a prompt: 16 hex digits of the SHA-256 of its messages (equal prompts: equal uid)."""
    payload = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """One prompt with its ground-truth answer, as read from a data file."""

    uid: str
    """Stable id of the prompt (`prompt_uid(messages)`); repeated prompts (AIME's 32 copies) share it."""
    messages: tuple[Message, ...]
    """Chat messages, DAPO template applied to the last user message; the chat template comes later."""
    answer: str
    """Ground-truth answer (integers in the source become their decimal string)."""
    data_source: str
    """Where the example comes from: the `data_source` column, or the file's stem when there is none."""
    source: str
    """Path of the file the example was read from."""
    row: int
    """0-based row in that file (line-oriented files: the 0-based line index)."""

    @property
    def prompt_text(self) -> str:
        """Content of the last user message (the templated problem)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        # The readers require a user message, so only hand-made examples get here; say what is wrong.
        raise ValueError(f"example {self.uid} has no user message")

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as `{"role", "content"}` dicts, the form tokenizers' chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True)
class ReaderSettings:
    """How to read rows from a data file."""

    prompt_key: str = "prompt"
    """Column with the prompt: a list of chat messages (reference schema) or a bare problem string."""
    answer_key: str = "reward_model.ground_truth"
    """Column with the ground-truth answer; dots descend into nested structs/objects."""
    data_source_key: str = "data_source"
    """Optional column naming the data source; the file's stem is used where it is absent or empty."""
    apply_template: str = "auto"
    """"auto": DAPO template on prompts not already templated; "always": on every prompt; "never"."""
    dedup: bool = True
    """Keep only the first occurrence of each prompt (compared after templating). Off for evaluation."""
    strict: bool = False
    """Raise `DataError` on the first bad row instead of skipping it."""
    max_rows: int | None = None
    """Read at most this many rows from each file (None: all)."""

    def __post_init__(self) -> None:
        for key in ("prompt_key", "answer_key", "data_source_key"):
            value = getattr(self, key)
            # An empty key or dotted segment can never name a column; say so here, not as "missing column".
            if not isinstance(value, str) or "" in value.split("."):
                raise ValueError(f"ReaderSettings.{key}={value!r}: expected a column name or dotted path")
        if self.apply_template not in APPLY_TEMPLATE_CHOICES:
            allowed = ", ".join(repr(c) for c in APPLY_TEMPLATE_CHOICES)
            raise ValueError(
                f"ReaderSettings.apply_template={self.apply_template!r}: allowed values: {allowed}"
            )
        for key in ("dedup", "strict"):
            # A string such as "false" would be truthy; require real booleans.
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"ReaderSettings.{key}={getattr(self, key)!r}: expected True or False")
        rows = self.max_rows
        # bool is an int subclass; max_rows=True is a mistake, not "one row".
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"ReaderSettings.max_rows={rows!r}: expected a positive integer or None")


DEFAULT_SETTINGS = ReaderSettings()
"""The reference schema (`prompt`, `reward_model.ground_truth`, `data_source`), template "auto", dedup on."""


@dataclass
class LoadedDataset:
    """The examples read from one or more files, with what was dropped and why."""

    examples: list[Example]
    """Usable examples in file order (after deduplication when enabled)."""
    num_rows: int
    """Rows read (line-oriented files: non-blank lines)."""
    num_skipped: int
    """Rows dropped as invalid."""
    num_duplicates: int
    """Valid rows dropped because an earlier row had the same prompt (conflicting ones included)."""
    num_conflicts: int = 0
    """Of the duplicates, those whose answer differs from the kept row's answer."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(0-based row, reason) of dropped rows, at most `MAX_SKIPPED_RECORDED`; reasons start with the file."""
    sources: list[str] = field(default_factory=list)
    """The files read, in order."""

    def __len__(self) -> int:
        return len(self.examples)


class _RowError(Exception):
    """A row is unusable; carries the reason (without file and row, which the caller adds)."""


_MISSING: Any = object()
"""Marks a key absent from a row (distinct from a null value)."""


@dataclass
class _RawRows:
    """Column values of one file before validation: `values[key][i]` belongs to row `rows[i]`."""

    rows: list[int]
    values: dict[str, list[Any]]
    """Per key, one value per row, or `_MISSING` where the row lacks the key."""
    errors: dict[int, str]
    """Rows that could not be parsed at all (bad JSON, not an object), by row number."""
    line_numbers: bool
    """True for line-oriented files, whose messages also give the 1-based line number."""


def _row_label(row: int, line_numbers: bool) -> str:
    """Name a row in a message, with the 0-based convention spelled out."""
    return f"row {row} (0-based, line {row + 1})" if line_numbers else f"row {row} (0-based)"


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelt key, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _missing_key_error(source: str, key: str, missing: str, available: Sequence[str], what: str) -> DataError:
    """The error for a key absent from the whole file, listing what exists (`what`) and the closest names."""
    part = f" (its part {missing!r} is missing)" if missing != key else ""
    listed = ", ".join(repr(a) for a in available) or "none"
    return DataError(
        f"{source}: key {key!r} not found{part}; {what}: {listed}" + _did_you_mean(missing, available)
    )


# -------------------------------------------------------------------------------------------------- parquet


def _resolve_parquet_key(source: str, schema: Any, key: str) -> tuple[str, list[str]] | None:
    """Map a (dotted) key to (top-level column, nested field names); None if that column is absent."""
    if key in schema.names:
        # A column whose own name contains dots wins over descending into structs.
        return key, []
    parts = key.split(".")
    if parts[0] not in schema.names:
        return None
    dtype = schema.field(parts[0]).type
    for i, part in enumerate(parts[1:], start=1):
        parent = ".".join(parts[:i])
        if not pa.types.is_struct(dtype):
            raise DataError(f"{source}: key {key!r}: column {parent!r} has type {dtype}, not a struct")
        names = [dtype.field(j).name for j in range(dtype.num_fields)]
        if part not in names:
            raise _missing_key_error(source, key, part, names, f"fields of {parent!r}")
        dtype = dtype.field(part).type
    return parts[0], parts[1:]


def _open_parquet(path: Path, keys: dict[str, bool]) -> tuple[Any, dict[str, tuple[str, list[str]]]]:
    """A parquet file's footer and the column (and struct path) of each key found; reads no data pages.
    `keys` maps each key to whether it is required."""
    source = str(path)
    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        # pyarrow's message does not always name the file; wrap it so it does.
        raise DataError(f"{source}: cannot read parquet file: {exc}") from exc
    resolved: dict[str, tuple[str, list[str]]] = {}
    for key, required in keys.items():
        found = _resolve_parquet_key(source, schema, key)
        if found is not None:
            resolved[key] = found
        elif required:
            raise _missing_key_error(source, key, key.split(".")[0], schema.names, "columns")
    return file, resolved


def _read_parquet(path: Path, keys: dict[str, bool], max_rows: int | None) -> _RawRows:
    """Read the needed columns of a parquet file; `keys` maps each key to whether it is required."""
    source = str(path)
    file, resolved = _open_parquet(path, keys)
    columns = sorted({column for column, _ in resolved.values()})
    try:
        table = file.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        # The footer may parse while data pages are corrupt; same wrapping as above.
        raise DataError(f"{source}: cannot read columns {columns}: {exc}") from exc
    if max_rows is not None:
        table = table.slice(0, max_rows)
    values: dict[str, list[Any]] = {}
    for key in keys:
        if key not in resolved:
            values[key] = [_MISSING] * table.num_rows
            continue
        column, nested = resolved[key]
        array = table.column(column)
        if nested:
            # struct_field turns a null parent into a null child, so a null struct reads as a null value.
            array = pc.struct_field(array, nested)
        values[key] = array.to_pylist()
    return _RawRows(rows=list(range(table.num_rows)), values=values, errors={}, line_numbers=False)


# ----------------------------------------------------------------------------------------------------- json


def _lookup(obj: dict[str, Any], key: str) -> Any:
    """Value at a (dotted) key in a JSON object, or `_MISSING`."""
    if key in obj:
        # A key that itself contains dots wins over descending into nested objects.
        return obj[key]
    value: Any = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _missing_json_key(source: str, key: str, objects: Sequence[dict[str, Any]]) -> DataError:
    """The error for a key in no row of a JSON file, listing the keys where the dotted path broke off."""
    parts = key.split(".")
    depth, parent = 0, None
    for obj in objects:
        value: Any = obj
        level = 0
        while level < len(parts) and isinstance(value, dict) and parts[level] in value:
            value = value[parts[level]]
            level += 1
        if isinstance(value, dict) and level > depth:
            depth, parent = level, value
    if parent is None:
        top = sorted({name for obj in objects for name in obj})
        if parts[0] in top:
            # The first part exists but never holds an object, so the dotted path cannot descend.
            return DataError(
                f"{source}: key {key!r}: {parts[0]!r} is never a JSON object, so it has no {parts[1]!r}"
            )
        return _missing_key_error(source, key, parts[0], top, "keys in the rows")
    return _missing_key_error(
        source, key, parts[depth], sorted(parent), f"keys of {'.'.join(parts[:depth])!r}"
    )


# json.loads recurses once per nesting level and raises RecursionError past Python's recursion limit
_TOO_DEEP = "nested too deeply to parse (arrays or objects beyond Python's recursion limit)"


def _read_json(path: Path, keys: dict[str, bool], max_rows: int | None) -> _RawRows:
    """Read a jsonl file (or a .json file holding one array); `keys` maps each key to "is required"."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        # Reword the OS error so it names the file and what we were doing.
        raise DataError(f"{source}: cannot read file: {exc}") from exc
    items: list[tuple[int, Any]] = []
    errors: dict[int, str] = {}
    line_numbers = True
    if path.suffix.lower() == ".json" and data.lstrip()[:1] == b"[":
        # A .json file may be one array of objects instead of JSON lines; then rows are array indices.
        line_numbers = False
        try:
            array = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{source}: not valid JSON: {exc}") from exc
        except RecursionError:
            raise DataError(f"{source}: not valid JSON: {_TOO_DEEP}") from None
        items = list(enumerate(array))[:max_rows]
    else:
        for index, line in enumerate(data.split(b"\n")):
            if not line.strip():
                # Blank lines (a trailing newline, spacing) are not rows; they still count in the numbering.
                continue
            if max_rows is not None and len(items) >= max_rows:
                break
            try:
                items.append((index, json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                errors[index] = f"bad JSON line: {exc}"
                items.append((index, None))
            except RecursionError:
                errors[index] = f"bad JSON line: {_TOO_DEEP}"
                items.append((index, None))
    objects: list[dict[str, Any]] = []
    for index, obj in items:
        if index in errors:
            continue
        if not isinstance(obj, dict):
            errors[index] = f"expected a JSON object, got {type(obj).__name__}"
            continue
        objects.append(obj)
    values: dict[str, list[Any]] = {}
    for key, required in keys.items():
        column = [_MISSING if index in errors else _lookup(obj, key) for index, obj in items]
        # The whole-file check needs one parsed row; without any, the row errors say what is wrong.
        if required and objects and all(v is _MISSING for v in column):
            raise _missing_json_key(source, key, objects)
        values[key] = column
    return _RawRows([index for index, _ in items], values, errors, line_numbers)


# ----------------------------------------------------------------------------------------------- validation


def _check_present(value: Any, key: str, accepted: str) -> None:
    """A missing key, a null, or a blank string is a row error naming the key."""
    if value is _MISSING:
        raise _RowError(f"missing key {key!r}")
    if value is None:
        raise _RowError(f"{key!r} is null; expected {accepted}")
    if isinstance(value, str) and not value.strip():
        raise _RowError(f"{key!r} is an empty string")


def _to_messages(value: Any, key: str) -> tuple[Message, ...]:
    """Validate a prompt: a non-empty string, or {role, content} dicts with a non-empty user message."""
    accepted = "a non-empty string (bare problem) or a list of {'role', 'content'} messages"
    _check_present(value, key, accepted)
    if isinstance(value, str):
        return (Message("user", value),)
    if not isinstance(value, list):
        raise _RowError(f"{key!r} has type {type(value).__name__}; expected {accepted}")
    if not value:
        raise _RowError(f"{key!r} is an empty message list")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _RowError(
                f"{key!r}[{i}] has type {type(item).__name__}; expected a {{'role', 'content'}} dict"
            )
        role, content = item.get("role"), item.get("content")
        if role not in ALLOWED_ROLES:
            raise _RowError(f"{key!r}[{i}].role is {role!r}; allowed roles: {', '.join(ALLOWED_ROLES)}")
        if not isinstance(content, str):
            raise _RowError(f"{key!r}[{i}].content has type {type(content).__name__}; expected a string")
        messages.append(Message(role, content))
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise _RowError(f"{key!r} has no message with role 'user'")
    if not messages[users[-1]].content.strip():
        raise _RowError(f"{key!r}[{users[-1]}] (the last user message) has empty content")
    return tuple(messages)


def _apply_template(messages: tuple[Message, ...], mode: str) -> tuple[Message, ...]:
    """Apply the DAPO template to the last user message according to `mode` ("auto", "always", "never")."""
    if mode == "never":
        return messages
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    content = messages[last].content
    if mode == "auto" and is_templated(content):
        return messages
    return (*messages[:last], Message("user", apply_dapo_template(content)), *messages[last + 1 :])


def _to_answer(value: Any, key: str) -> str:
    """Validate an answer: a non-empty string, an int, or an integral float (becomes the integer's string)."""
    accepted = "a non-empty string, an integer, or an integral float"
    _check_present(value, key, accepted)
    if isinstance(value, str):
        return value
    # bool is an int subclass, but True as an answer is a data error, not "1".
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise _RowError(f"{key!r} is the non-integral float {value!r}; store such answers as strings")
    raise _RowError(f"{key!r} has type {type(value).__name__}; expected {accepted}")


def _to_data_source(value: Any, key: str, default: str) -> str:
    """The data source of a row: the value if a non-empty string, `default` if absent, null or empty."""
    if value is _MISSING or value is None or value == "":
        return default
    if not isinstance(value, str):
        raise _RowError(f"{key!r} has type {type(value).__name__}; expected a string")
    return value


# -------------------------------------------------------------------------------------------------- loading


@dataclass
class _FileResult:
    """Valid examples of one file (before deduplication) and its skipped rows."""

    examples: list[Example]
    num_rows: int
    num_skipped: int
    skipped: list[tuple[int, str]]


def _check_path(path: Path) -> None:
    """The file-level checks every format shares: a known extension and a regular file."""
    source = str(path)
    if path.suffix.lower() not in ALLOWED_EXTENSIONS:
        allowed = ", ".join(ALLOWED_EXTENSIONS)
        raise DataError(f"{source}: unknown file extension {path.suffix!r}; allowed: {allowed}")
    if not path.is_file():
        # Checked before reading so every format gives the same message.
        raise DataError(f"{source}: no such file" if not path.exists() else f"{source}: not a regular file")


def _reader_keys(settings: ReaderSettings) -> dict[str, bool]:
    return {settings.prompt_key: True, settings.answer_key: True, settings.data_source_key: False}


def check_file(path: str | Path, settings: ReaderSettings = DEFAULT_SETTINGS) -> None:
    """Raise `DataError` for what can be found wrong with a data file without reading its rows: unknown
    extension, missing path, a directory, and for parquet an unreadable footer or a missing column."""
    path = Path(path)
    _check_path(path)
    if path.suffix.lower() == ".parquet":
        _open_parquet(path, _reader_keys(settings))


def _read_file(path: Path, settings: ReaderSettings) -> _FileResult:
    """Read and validate one file; skip (warning once) or raise on bad rows, per `settings.strict`."""
    source = str(path)
    _check_path(path)
    keys = _reader_keys(settings)
    reader = _read_parquet if path.suffix.lower() == ".parquet" else _read_json
    raw = reader(path, keys, settings.max_rows)
    prompts = raw.values[settings.prompt_key]
    answers = raw.values[settings.answer_key]
    data_sources = raw.values[settings.data_source_key]
    examples: list[Example] = []
    skipped: list[tuple[int, str]] = []
    num_skipped = 0
    first_bad = ""
    for i, row in enumerate(raw.rows):
        try:
            if row in raw.errors:
                raise _RowError(raw.errors[row])
            messages = _to_messages(prompts[i], settings.prompt_key)
            messages = _apply_template(messages, settings.apply_template)
            answer = _to_answer(answers[i], settings.answer_key)
            data_source = _to_data_source(data_sources[i], settings.data_source_key, path.stem)
        except _RowError as exc:
            label = _row_label(row, raw.line_numbers)
            if settings.strict:
                raise DataError(f"{source}: {label}: {exc}") from None
            num_skipped += 1
            first_bad = first_bad or f"{label}: {exc}"
            if len(skipped) < MAX_SKIPPED_RECORDED:
                skipped.append((row, f"{source}: {exc}"))
            continue
        examples.append(Example(prompt_uid(messages), messages, answer, data_source, source, row))
    if num_skipped:
        warnings.warn(
            f"{source}: skipped {num_skipped} of {len(raw.rows)} rows; first: {first_bad} "
            "(ReaderSettings(strict=True) raises instead)",
            DataWarning,
            stacklevel=2,
        )
    return _FileResult(examples, len(raw.rows), num_skipped, skipped)


def load_many(paths: Sequence[str | Path], settings: ReaderSettings = DEFAULT_SETTINGS) -> LoadedDataset:
    """Read several files into one dataset, deduplicating across files when `settings.dedup` is set.

    Raises `DataError` for an unusable file, for the first bad row when `settings.strict` is set, for a
    duplicate prompt with a different answer when both `strict` and `dedup` are set, and when no usable
    example remains. Warns (`DataWarning`) once per file with skipped rows, and once per call for
    conflicting duplicates.
    """
    if isinstance(paths, (str, Path)):
        # A bare string is a Sequence of characters; reading each as a file would give baffling errors.
        raise TypeError("load_many takes a list of paths; use load_examples for a single file")
    if not paths:
        # An empty list is almost surely a config mistake; say so instead of returning nothing.
        raise DataError("load_many: no data files given")
    results = [_read_file(Path(p), settings) for p in paths]
    sources = [str(Path(p)) for p in paths]
    examples: list[Example] = []
    num_duplicates = num_conflicts = 0
    first_conflict = ""
    if settings.dedup:
        kept: dict[tuple[Message, ...], Example] = {}
        for example in (example for result in results for example in result.examples):
            previous = kept.setdefault(example.messages, example)
            if previous is example:
                examples.append(example)
                continue
            num_duplicates += 1
            if previous.answer != example.answer:
                num_conflicts += 1
                first_conflict = first_conflict or (
                    f"{example.source}: {_row_label(example.row, False)} repeats the prompt of "
                    f"{previous.source}: {_row_label(previous.row, False)} with answer {example.answer!r} "
                    f"instead of {previous.answer!r}"
                )
                if settings.strict:
                    raise DataError(f"conflicting duplicate: {first_conflict}")
    else:
        examples = [example for result in results for example in result.examples]
    if num_conflicts:
        warnings.warn(
            f"{num_conflicts} duplicate prompt(s) with a different answer were dropped (the first row's "
            f"answer is kept); first: {first_conflict}",
            DataWarning,
            stacklevel=2,
        )
    if not examples:
        # Training or evaluating on nothing is never intended; fail here with the reason rather than later.
        first = next((r.skipped[0] for r in results if r.skipped), None)
        detail = f"; first skipped: {first[1]} ({_row_label(first[0], False)})" if first else " (no rows)"
        raise DataError(f"no usable examples in {', '.join(sources)}{detail}")
    return LoadedDataset(
        examples=examples,
        num_rows=sum(r.num_rows for r in results),
        num_skipped=sum(r.num_skipped for r in results),
        num_duplicates=num_duplicates,
        num_conflicts=num_conflicts,
        skipped=[entry for result in results for entry in result.skipped][:MAX_SKIPPED_RECORDED],
        sources=sources,
    )


def load_examples(path: str | Path, settings: ReaderSettings = DEFAULT_SETTINGS) -> LoadedDataset:
    """Read one `.parquet`, `.jsonl` or `.json` file (formats, validation and dedup: module docstring)."""
    return load_many([path], settings)
