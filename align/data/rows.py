"""Reading and validating data: files users bring (JSONL, JSON, Parquet, CSV), saved HF datasets, hub datasets.

Every row either becomes an `Example` or is rejected with a reason that names its file and row. Rejects are
written next to the run so they can be fixed; too many of them (more than `data.max_reject_share`) stop the
stage before any model is loaded.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from align.data.shipped import locate
from align.modeling.formatting import Encoded, Messages, encode
from align.runtime.errors import DataError, FormatError, NotAPair, RowError
from align.runtime.runs import atomic_write_text, json_hash, sha256_path

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Example:
    prompt: Messages | None
    completion: Messages | None
    text: str | None
    source: str
    row: int
    fields: dict[str, Any] | None = None  # an RL prompt's whole row: what its reward functions read


@dataclass
class Reject:
    source: str
    row: int
    reason: str
    preview: str

    def where(self) -> str:
        return f"{self.source}:{self.row}"


# ---------------------------------------------------------------------------------------------- reading


def resolve_path(spec: str) -> Path | None:
    """A local file/directory for `spec`: as given (the working directory), else in the checkout or the installed
    package's copy of the shipped data (align.data.shipped.locate); None when there is none (a hub id)."""
    p = Path(spec).expanduser()
    return p if p.exists() else locate(p)


def split_spec(spec: str) -> list[str]:
    """`a.jsonl,b.jsonl` names several sources read one after the other (e.g. old pairs plus a new batch); a
    path that exists with a comma in its name is one source."""
    if "," not in spec or resolve_path(spec) is not None:
        return [spec]
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):
        raise DataError(f"data spec {spec!r}: an empty name between commas")
    return parts


def data_hash(spec: str) -> str:
    """Content hash of local data; a hub dataset is identified by its name only."""
    parts = split_spec(spec)
    if len(parts) > 1:
        return json_hash([data_hash(p) for p in parts])
    path = resolve_path(spec)
    return sha256_path(path) if path is not None else f"hub:{spec}"


def read_rows(spec: str, split: str = "train") -> Iterator[tuple[str, int, Any]]:
    """Yield (source, row number, raw row or a RowError) — a broken line is a row-level problem, not fatal."""
    parts = split_spec(spec)
    if len(parts) > 1:
        for part in parts:
            yield from read_rows(part, split)
        return
    path = resolve_path(spec)
    if path is None:
        if spec.startswith((".", "/", "~")) or Path(spec).suffix in SUFFIXES or spec.count("/") > 1:
            raise DataError(f"data file not found: {spec}")
        yield from _read_hub(spec, split)
    elif path.is_dir():
        yield from _read_saved_dataset(path, split)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUFFIXES)} "
                        "or a directory saved with datasets' save_to_disk")


def _read_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, "rb") as f:
        yield from jsonl_rows(f, str(path))


def jsonl_rows(stream: IO[bytes], source: str) -> Iterator[tuple[str, int, Any]]:
    """(source, line number, row or RowError) for each non-blank line of a binary JSONL stream."""
    for lineno, raw in enumerate(stream, start=1):
        if lineno == 1 and raw.startswith(BOM):  # editors on Windows start UTF-8 files with one
            raw = raw[len(BOM):]
        elif lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # e.g. PowerShell's `>` writes UTF-16
            raise DataError(f"{source}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); re-save it as "
                            "UTF-8")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield source, lineno, RowError(f"not valid UTF-8: byte {e.start + 1} of the line is 0x{raw[e.start]:02x}; "
                                           "re-save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line.rstrip("\r\n"))  # (a line cut short is then an unterminated string, not a newline)
        except json.JSONDecodeError as e:
            row = RowError(f"broken JSON line: {_json_error(e)} at column {e.colno}")
        except (ValueError, RecursionError) as e:  # valid syntax json cannot hold: a huge number, deep nesting
            row = RowError(f"unreadable JSON line: {_json_limit(e)}")
        yield source, lineno, row


BOM = b"\xef\xbb\xbf"


def _json_error(e: json.JSONDecodeError) -> str:
    return e.msg.removesuffix(" at")  # "Unterminated string starting at" + " at column 9" reads "at at"


def _json_limit(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "arrays/objects nested too deeply"
    return str(e).split(";")[0]  # e.g. "Exceeds the limit (4300 digits) for integer string conversion ..."


def _read_json(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: broken JSON at line {e.lineno}, column {e.colno}: {_json_error(e)}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: unreadable JSON: {_json_limit(e)}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows (use .jsonl for one row per line)")
    for i, row in enumerate(data, start=1):
        yield str(path), i, row


def _read_parquet(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    for i, row in enumerate(rows, start=1):
        yield str(path), i, row


def _read_csv(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Rows numbered by the file line they start on (line 1 is the header); quoted fields may span lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
    # newline="": line breaks inside quoted fields are kept, and only \r / \n end a record (str.splitlines
    # would also split at \x0c, \x85, \u2028 ... inside a field)
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a field is never longer than the file (default limit 128 KiB)
    try:
        records, start = [], 1
        for record in reader:
            if record:  # a blank line is not a row
                records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not readable as CSV: {e}") from None
    finally:
        csv.field_size_limit(limit)
    if not records:
        return
    (_, header), rows = records[0], records[1:]
    for line, record in rows:
        # message lists travel through CSV as JSON text; a short record's missing fields are null
        yield str(path), line, {k: _maybe_json(v) for k, v in zip(header, record + [None] * len(header))}


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or too deep / a huge number for it): plain text
            return value
    return value


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, int, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a dataset directory saved with save_to_disk: {e}") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (it has {', '.join(ds)}); set data.split")
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield f"{path}[{split}]", i, row


def _read_hub(name: str, split: str) -> Iterator[tuple[str, int, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"data {name!r} is neither a local file nor a dataset the hub could give: {e}") from None
    for i, row in enumerate(ds, start=1):
        yield f"{name}[{split}]", i, row


# ---------------------------------------------------------------------------------------------- validation


def _text(row: dict, key: str, where: str = "") -> str:
    value = row[key]
    if value is None:
        raise RowError(f"{where}'{key}' is null")
    if not isinstance(value, str):
        raise RowError(f"{where}'{key}' must be a string, got {type_name(value)}")
    if not value.strip():
        raise RowError(f"{where}'{key}' is empty or whitespace only")
    # a lone surrogate comes from a JSON escape like "\ud800": not text, and no tokenizer (or UTF-8 file) takes it
    bad = None if value.isascii() else _SURROGATE.search(value)
    if bad:
        raise RowError(f"{where}'{key}' holds an unpaired UTF-16 surrogate ({bad[0]!r} at character {bad.start()}), "
                       "which is not text; fix the escape sequence that wrote it")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def type_name(value: Any) -> str:
    """A value's type in the words of the data file (JSON null, not Python's NoneType)."""
    return "null" if value is None else type(value).__name__


def shown(value: Any, limit: int = 60) -> str:
    """A user value quoted for a message: repr (so surrogates and control characters are escaped), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_messages(messages: Any, key: str, ordered: bool = True) -> Messages:
    """A list of {role, content} in an order chat templates render: [system] user assistant user ..."""
    if messages is None:
        raise RowError(f"'{key}' is null")
    if not isinstance(messages, list):
        raise RowError(f"'{key}' must be a list of messages, got {type_name(messages)}")
    if not messages:
        raise RowError(f"'{key}' is an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{key}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise RowError(f"{key}[{i}] has unknown role {shown(m['role'])}; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _text(m, "content", f"{key}[{i}]: ")})
    roles = [m["role"] for m in out]
    if not ordered:
        return out
    body = roles[1:] if roles[0] == "system" else roles
    for i, role in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise RowError(f"'{key}' has role order {' → '.join(roles)}, which chat templates cannot render: after an "
                           "optional first system message, user and assistant must alternate, starting with user")
    return out


def parse_row(row: Any) -> tuple[Messages | None, Messages | None, str | None]:
    """(prompt, completion, text) of one raw row, or RowError."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type_name(row)}")
    if "messages" in row:
        messages = check_messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise RowError("'messages' must end with an assistant message (the answer to learn)")
        return messages[:-1], messages[-1:], None
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise RowError(f"missing key '{key}' (a prompt/completion row needs both)")
        prompt = _as_messages(row["prompt"], "prompt", "user")
        completion = _as_messages(row["completion"], "completion", "assistant", ordered=False)
        if prompt[-1]["role"] != "user":
            raise RowError("'prompt' must end with a user message")
        if [m["role"] for m in completion] != ["assistant"]:
            raise RowError("'completion' must be exactly one assistant message")
        return prompt, completion, None
    if "text" in row:
        return None, None, _text(row, "text")
    raise RowError(f"missing key: a row needs 'messages', 'prompt' + 'completion', or 'text' (found: {keys_of(row)})")


def keys_of(row: dict, limit: int = 8) -> str:
    """The keys a row has, for a message: the first few, each cut short, control characters escaped."""
    keys = [k if isinstance(k, str) and k.isprintable() and len(k) <= 40 else shown(k, 40) for k in list(row)[:limit]]
    return ", ".join(keys) + (f" and {len(row) - limit} more" if len(row) > limit else "") or "none"


def _as_messages(value: Any, key: str, role: str, ordered: bool = True) -> Messages:
    if isinstance(value, str) or value is None:
        return [{"role": role, "content": _text({key: value}, key)}]
    return check_messages(value, key, ordered)


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    encoded: list[Any]
    examples: list[Any]
    rejects: list[Reject]
    total: int
    left_out: int = 0  # valid rows that hold no example (NotAPair), counted apart from rejects


def load_rows(spec: str, convert: Callable[[Any], tuple[Any, Any]], split: str = "train",
              limit: int | None = None) -> Loaded:
    """Read every row and convert it (parse + encode); a RowError or FormatError rejects the row with its reason."""
    encoded, examples, rejects, total, left_out = [], [], [], 0, 0
    for source, row_no, raw in read_rows(spec, split):
        if limit is not None and len(encoded) >= limit:
            break
        total += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            enc, example = convert(raw)
        except NotAPair:
            total -= 1
            left_out += 1
            continue
        except (RowError, FormatError) as e:
            rejects.append(Reject(source, row_no, str(e), _preview(raw)))
            continue
        encoded.append(enc)
        examples.append(dataclasses.replace(example, source=source, row=row_no))
    if total == 0:
        held = f" ({left_out} rows are ties or 'both bad' judgements, which hold no pair)" if left_out else \
            " (the file is empty)"
        raise DataError(f"{spec}: no rows{held}")
    if left_out:
        log.info("%s: %d rows judged a tie or 'both bad' are kept in the file but hold no pair: left out", spec,
                 left_out)
    return Loaded(encoded, examples, rejects, total, left_out)


def load_sft_data(spec: str, tokenizer, max_length: int, completion_only: bool, split: str = "train",
                  limit: int | None = None) -> Loaded:
    """Read, validate and tokenize every row (through the one formatting path)."""
    def convert(raw: Any) -> tuple[Encoded, Example]:
        prompt, completion, text = parse_row(raw)
        bound = char_bound(tokenizer, max_length)
        if prompt is not None and chars(prompt) > bound:
            raise FormatError(f"nothing left to learn after truncation: the prompt alone is {chars(prompt):,} "
                              f"characters, more than data.max_length={max_length} tokens can hold")
        # the answer (or text) is cut at max_length tokens anyway: tokenize only a part that surely covers them
        if text is not None and len(text) > bound:
            text = text[:bound]
        if completion is not None and chars(completion) > bound:
            completion = [{**completion[-1], "content": completion[-1]["content"][:bound]}]
        enc = encode(tokenizer, prompt, completion, text, max_length, completion_only)
        return enc, Example(prompt, completion, text, "", 0)

    return load_rows(spec, convert, split, limit)


def chars(messages: Messages) -> int:
    return sum(len(m["content"]) for m in messages)


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    return max(map(len, tokenizer.get_vocab()), default=1)


def char_bound(tokenizer, max_tokens: int) -> int:
    """Characters beyond which text certainly takes more than `max_tokens` tokens.

    No token covers more characters than its string in the vocabulary (bytes, for byte-level BPE) has; the
    factor 4 leaves room for a normalizer that merges characters and for merges with the template's text. Rows
    over it are cut or refused before tokenizing: tokenizing a 5 MB row takes ~5 s and ~1 GB of memory (SmolLM2's
    tokenizer, one core), so a 50 MB one would take a minute and most of a small machine's memory.
    """
    return 4 * max_tokens * _longest_token(tokenizer)


def _preview(raw: Any, limit: int = 200) -> str:
    try:
        text = str(raw) if isinstance(raw, RowError) else json.dumps(raw, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):  # circular or too deep: not from a file, but never fail over a preview
        text = shown(raw, limit)
    text = text if len(text) <= limit else text[:limit] + "…"
    # a lone surrogate (from a "\ud800" escape) cannot be written as UTF-8: show it as its escape
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    lines = [json.dumps({"source": r.source, "row": r.row, "reason": r.reason, "row_preview": r.preview},
                        ensure_ascii=False) for r in rejects]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def check_reject_share(loaded: Loaded, max_share: float, rejects_path: Path, what: str) -> None:
    """Fail with a summary when too many rows were rejected (or none is left)."""
    n_bad = len(loaded.rejects)
    share = n_bad / loaded.total
    if loaded.encoded and share <= max_share:
        return
    reasons = Counter(r.reason for r in loaded.rejects).most_common(5)
    lines = [f"{what}: {n_bad} of {loaded.total} rows rejected ({share:.1%}; data.max_reject_share is "
             f"{max_share:.1%}). All rejects with reasons: {rejects_path}"]
    lines += [f"  {count} × {reason}" for reason, count in reasons]
    lines += [f"  first: {r.where()}: {r.reason}" for r in loaded.rejects[:3]]
    if not loaded.encoded:
        lines.append("  no usable rows remain")
    else:
        lines.append("  fix the rows, or raise data.max_reject_share to train on the valid rows")
    raise DataError("\n".join(lines))
