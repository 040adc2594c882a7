"""Where samples come from: local files (globs) or a `datasets` hub name, as record dicts.

`format: text` reads every selected file as one UTF-8 document whatever its suffix, except
.json / .jsonl / .parquet, whose `text_field` column holds the documents. `prompt_completion`
and `chat` read records from .jsonl (one JSON object per line), .json (a list of objects) or
.parquet; a malformed record stops the run with the file and line (or row) named.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UserError

if TYPE_CHECKING:
    from ..experiment import DataConfig

JSON_EXT = {".json", ".jsonl"}
TABLE_EXT = JSON_EXT | {".parquet"}


def expand_files(patterns: list[str], key: str) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not hits:
            raise ConfigError(f"{key}: {pat!r} matches no file")
        files += [Path(h) for h in hits if Path(h).is_file()]
    return files


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data: {str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _rows(f: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a .jsonl / .json / .parquet file; `where` names the line."""
    ext = f.suffix.lower()
    if ext == ".jsonl":
        with f.open(encoding="utf-8") as fh:
            try:
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{f}:{i}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"data: {f}:{i}: not a JSON object ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise UserError(f"data: {str(f)!r} is not UTF-8 text ({e.reason})") from None
    elif ext == ".json":
        try:
            data = json.loads(_read_text(f))
        except json.JSONDecodeError as e:
            raise UserError(f"data: {f}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = data if isinstance(data, list) else [data]
        for i, row in enumerate(rows):
            yield f"{f} item {i}", row
    else:  # .parquet, streamed by record batch
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(f))
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UserError(f"data: cannot read {str(f)!r}: {type(e).__name__}: {e}") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{f} row {i}", row
                i += 1


def _field(row: Any, name: str, where: str, key: str) -> Any:
    if not isinstance(row, dict):
        raise UserError(f"data: {where}: expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise UserError(
            f"data: {where}: no field {name!r} (fields: {', '.join(map(str, row)) or 'none'}; "
            f"set data.{key} to the field's name)"
        )
    return row[name]


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat record's messages: a non-empty list of {role, content} with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"data: {where}: messages must be a non-empty list of {{role, content}}")
    out = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(
                f'data: {where}: message {j} must be {{"role": str, "content": str}}, got {m!r:.80}'
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"data: {where}: no assistant message, so nothing to learn")
    return out


def _record(row: Any, where: str, cfg: DataConfig) -> dict[str, Any]:
    if cfg.format == "prompt_completion":
        rec = {}
        for key in ("prompt_field", "completion_field"):
            value = _field(row, getattr(cfg, key), where, key)
            if not isinstance(value, str):
                raise UserError(
                    f"data: {where}: field {getattr(cfg, key)!r} must be a string, got {value!r:.60}"
                )
            rec[key.split("_")[0]] = value
        return rec | {"where": where}
    messages = check_messages(_field(row, cfg.messages_field, where, "messages_field"), where)
    return {"messages": messages, "where": where}


def file_records(files: list[Path], cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The records of local files for `cfg.format`: {"text"}, {"prompt", "completion", "where"}
    or {"messages", "where"} (`where` names the file and line for later errors)."""
    for f in files:
        ext = f.suffix.lower()
        if cfg.format == "text":
            if ext not in TABLE_EXT:
                yield {"text": _read_text(f)}
                continue
            for where, row in _rows(f):
                text = _field(row, cfg.text_field, where, "text_field")
                if isinstance(text, str):
                    yield {"text": text}
            continue
        if ext not in TABLE_EXT:
            raise ConfigError(
                f"data: {str(f)!r}: format {cfg.format!r} reads records from "
                f"{', '.join(sorted(TABLE_EXT))} files, not {ext or 'a file without suffix'!r}"
            )
        for where, row in _rows(f):
            yield _record(row, where, cfg)


def hub_records(name: str, split: str, cfg: DataConfig) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split ...
        raise UserError(
            f"data.hub_dataset: cannot load {name!r} split {split!r}: {type(e).__name__}: {e}"
        ) from None
    for i, row in enumerate(ds):
        where = f"{name}[{split}] row {i}"
        if cfg.format == "text":
            text = _field(row, cfg.text_field, where, "text_field")
            if isinstance(text, str):
                yield {"text": text}
        else:
            yield _record(row, where, cfg)
