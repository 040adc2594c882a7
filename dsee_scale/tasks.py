"""A real instruction task from local files only: summarise a standard-library function.

Each record is a chat: the user gives a function's source (its docstring removed) and asks for
its one-line summary; the assistant answers with the docstring's first line. The split is by
top-level module (assets.split_of), so held-out functions come from modules never trained on.

    python -m dsee_scale.tasks OUT_DIR   # writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl
"""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .assets import split_of, stdlib_files

INSTRUCTION = "Write the one-line docstring summary for this Python function.\n\n```python\n{code}\n```"
MAX_CODE_CHARS = 1200


def _summary(doc: str) -> str | None:
    first = doc.strip().split("\n\n")[0]
    line = " ".join(first.split())
    return line if 10 <= len(line) <= 120 and not line.startswith((">>>", "..")) else None


def _records(path: Path) -> Iterator[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        summary = _summary(doc) if doc else None
        if summary is None or len(node.body) < 2:
            continue
        node.body = node.body[1:]  # drop the docstring; the body stays
        try:
            code = ast.unparse(node)
        except Exception:  # noqa: BLE001 - ast.unparse fails on a few exotic nodes
            continue
        if len(code) > MAX_CODE_CHARS:
            continue
        yield {"messages": [{"role": "user", "content": INSTRUCTION.format(code=code)},
                            {"role": "assistant", "content": summary}]}  # fmt: skip


def write_docstring_task(out: Path, heldout_percent: int = 10) -> dict[str, int]:
    """Writes train.jsonl and heldout.jsonl; returns the record counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    handles = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in counts}
    try:
        for f in stdlib_files():
            split = split_of(f, heldout_percent)
            for rec in _records(f):
                handles[split].write(json.dumps(rec) + "\n")
                counts[split] += 1
    finally:
        for h in handles.values():
            h.close()
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dsee_scale.tasks OUT_DIR")
    print(write_docstring_task(Path(sys.argv[1])))
