"""Tokenized samples -> rows of exactly block_size tokens (`datasets` batched-map functions).

- text: documents joined with EOS and cut into blocks (plain language modelling; a block may
  hold the end of one document and the start of the next, as GPT-2 was trained).
- prompt_completion / chat, `packing: true`: whole samples placed one after another into a
  row until the next does not fit; position ids restart at 0 for every sample, which is how
  transformers' attention (eager, sdpa, flex, flash) knows to keep samples apart when no
  attention mask is given. The first token of every sample is never a label (nothing of its
  own sample precedes it). The rest of a row is padding (label -100, its own position run).
- `packing: false` (or an attention that cannot keep packed samples apart): one sample per row,
  right-padded, with an attention mask.

Samples longer than block_size follow `data.overlong`: drop (default), truncate (keep the
first block_size tokens; a sample left without answer tokens is dropped) or error.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .formats import IGNORE


def fit_lengths(batch: dict[str, list], block_size: int, overlong: str) -> dict[str, list]:
    """Apply the over-long rule: the kept samples, each marked truncated or not."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        cut = False
        if len(ids) > block_size:
            if overlong == "error":
                where = batch["where"][i] if "where" in batch else f"sample {i}"
                raise UserError(
                    f"data: {where}: {len(ids)} tokens, longer than block_size={block_size} "
                    "(data.overlong: error; allowed: drop, truncate, error)"
                )
            if overlong == "drop":
                continue
            ids, labels, cut = ids[:block_size], labels[:block_size], True
        if all(x == IGNORE for x in labels[1:]):
            continue  # no answer token left to learn from
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(cut)
    return out


def pack_text(batch: dict[str, list], block_size: int, eos: int) -> dict[str, list]:
    ids: list[int] = []
    for d in batch["input_ids"]:
        ids += d
        ids.append(eos)
    n = len(ids) // block_size
    rows = [ids[i * block_size : (i + 1) * block_size] for i in range(n)]
    return {"input_ids": rows}


def _new_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": []}


def _close(row: dict[str, list[int]], block_size: int, pad: int, out: dict[str, list]) -> None:
    k = block_size - len(row["input_ids"])
    row["input_ids"] += [pad] * k
    row["labels"] += [IGNORE] * k
    row["position_ids"] += list(range(k))
    for key, v in row.items():
        out[key].append(v)


def pack_samples(batch: dict[str, list], block_size: int, pad: int) -> dict[str, list]:
    """Greedy, in order: a sample joins the current row when it fits, else starts a new one."""
    out: dict[str, list] = _new_row()
    row = _new_row()
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        if len(row["input_ids"]) + len(ids) > block_size:
            _close(row, block_size, pad, out)
            row = _new_row()
        row["input_ids"] += ids
        row["labels"] += [IGNORE] + labels[1:]
        row["position_ids"] += list(range(len(ids)))
    if row["input_ids"]:
        _close(row, block_size, pad, out)
    return out


def pad_samples(batch: dict[str, list], block_size: int, pad: int) -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        k = block_size - len(ids)
        out["input_ids"].append(ids + [pad] * k)
        out["labels"].append(labels + [IGNORE] * k)
        out["attention_mask"].append([1] * len(ids) + [0] * k)
    return out


# attention implementations that honour restarting position ids as sample boundaries (through
# transformers' masking_utils packed-sequence detection, or flash-attention's varlen path)
PACKING_ATTENTION = {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"}


def packing_mode(config: Any, requested: bool) -> str:
    """'packed' or 'padded', for the model's attention implementation."""
    if not requested:
        return "padded"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return "packed" if impl in PACKING_ATTENTION else "padded"
