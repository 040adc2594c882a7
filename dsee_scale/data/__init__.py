"""Text files -> tokenized, packed blocks of block_size tokens, cached, sharded by rank.

Sources: local .txt / .py (one document per file), .json / .jsonl (a text field) and .parquet
read with `datasets`, or the built-in `python_stdlib` corpus split by module (assets.py).
Documents are tokenized with the model's tokenizer (a byte-level one for random models that
have none), joined with EOS and cut into blocks; the blocks are cached as safetensors under a
key of the inputs (files, sizes, mtimes, tokenizer, block size), so a second run reuses them.

Batches: the global order of blocks is a permutation seeded by (seed, epoch); optimizer step s
takes the next `batch_size` blocks, and rank r's micro-batch a of that step is a fixed slice of
them. The same global batch is therefore seen by 1 rank x 2 accumulation steps and by 2 ranks x 1,
and resuming at step s needs nothing but s.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, UserError

if TYPE_CHECKING:  # experiment.py holds the config sections; it does not import data/
    from ..experiment import DataConfig

TEXT_EXT = {".txt", ".py", ".md", ".text"}
JSON_EXT = {".json", ".jsonl"}


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255); EOS = 0. For random models without a tokenizer."""

    name_or_path = "bytes"
    eos_token_id = 0
    vocab_size = 256

    def __call__(self, text: str):
        return {"input_ids": list(text.encode("utf-8"))}


def expand_files(patterns: list[str], key: str) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not hits:
            raise ConfigError(f"{key}: {pat!r} matches no file")
        files += [Path(h) for h in hits if Path(h).is_file()]
    return files


def read_documents(files: list[Path], text_field: str) -> list[str]:
    """The documents of local files, through `datasets` for json / jsonl / parquet."""
    docs: list[str] = []
    for f in files:
        ext = f.suffix.lower()
        if ext in TEXT_EXT:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(
                    f"data: {str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
            continue
        if ext not in JSON_EXT | {".parquet"}:
            raise ConfigError(
                f"data: {str(f)!r} has an unsupported extension {ext!r}; allowed: "
                f"{', '.join(sorted(TEXT_EXT | JSON_EXT | {'.parquet'}))}"
            )
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(
                "json" if ext in JSON_EXT else "parquet", data_files=str(f), split="train"
            )
        except Exception as e:  # datasets raises many types for a malformed file
            raise UserError(f"data: cannot read {str(f)!r}: {type(e).__name__}: {e}") from None
        if text_field not in ds.column_names:
            raise ConfigError(
                f"data.text_field: {str(f)!r} has no column {text_field!r} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        docs += [t for t in ds[text_field] if isinstance(t, str)]
    return docs


def hub_documents(name: str, split: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split ...
        raise UserError(
            f"data.hub_dataset: cannot load {name!r} split {split!r}: {type(e).__name__}: {e}"
        ) from None
    if text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field: {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})"
        )
    return [t for t in ds[text_field] if isinstance(t, str)]


def _blocks_from_docs(docs: list[str], tokenizer, block_size: int, label: str) -> torch.Tensor:
    blocks = pack(docs, tokenizer, block_size)
    if blocks.shape[0] == 0:
        raise UserError(f"data: the {label} data holds fewer than block_size={block_size} tokens")
    return blocks


def _cache_key(files: list[Path], tokenizer, block_size: int, extra: str) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(
        f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}|"
        f"{getattr(tokenizer, 'vocab_size', '')}|{block_size}|{extra}".encode()
    )
    return h.hexdigest()[:24]


def pack(docs: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Concatenate tokenized documents, EOS between them, into (n_blocks, block_size)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d)["input_ids"]
        ids.append(eos)
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def load_blocks(
    files: list[Path], tokenizer, block_size: int, text_field: str, cache_dir: str | None, label: str
) -> torch.Tensor:
    """Packed blocks of `files`, from the cache when the inputs did not change."""
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir or Path.home() / ".cache" / "dsee_scale" / "data")
    key = _cache_key(files, tokenizer, block_size, text_field)
    path = cache / f"{label}-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["blocks"]
    blocks = _blocks_from_docs(
        read_documents(files, text_field), tokenizer, block_size, f"{label} ({len(files)} files)"
    )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"blocks": blocks.contiguous()}, str(tmp))
    os.replace(tmp, path)  # atomic: a reader never sees half a cache file
    return blocks


@dataclass
class Corpus:
    train: torch.Tensor  # (n, block_size) token ids
    eval: torch.Tensor | None

    def describe(self) -> str:
        ev = 0 if self.eval is None else self.eval.shape[0]
        return f"{self.train.shape[0]} train blocks, {ev} eval blocks of {self.train.shape[1]} tokens"


def build_corpus(data_cfg: DataConfig, tokenizer: Any) -> Corpus:
    """Train / eval blocks for an experiment's `data:` section."""
    from ..assets import split_of, stdlib_files

    hub = data_cfg.hub_dataset
    if hub:

        def hub_blocks(split: str, label: str) -> torch.Tensor:
            docs = hub_documents(hub, split, data_cfg.text_field)
            return _blocks_from_docs(docs, tokenizer, data_cfg.block_size, label)

        ev = hub_blocks(data_cfg.hub_eval_split, "eval") if data_cfg.hub_eval_split else None
        return _limit(Corpus(hub_blocks(data_cfg.hub_train_split, "train"), ev), data_cfg)
    if data_cfg.source == "python_stdlib":
        files = stdlib_files()
        train_files = [f for f in files if split_of(f, data_cfg.heldout_percent) == "train"]
        eval_files = [f for f in files if split_of(f, data_cfg.heldout_percent) == "heldout"]
    else:
        train_files = expand_files(data_cfg.train_files, "data.train_files")
        eval_files = expand_files(data_cfg.eval_files, "data.eval_files")
    train = load_blocks(
        train_files, tokenizer, data_cfg.block_size, data_cfg.text_field, data_cfg.cache_dir, "train"
    )
    ev = (
        load_blocks(
            eval_files, tokenizer, data_cfg.block_size, data_cfg.text_field, data_cfg.cache_dir, "eval"
        )
        if eval_files
        else None
    )
    return _limit(Corpus(train, ev), data_cfg)


def _limit(c: Corpus, data_cfg: DataConfig) -> Corpus:
    if data_cfg.max_train_blocks:
        c.train = c.train[: data_cfg.max_train_blocks]
    if c.eval is not None and data_cfg.max_eval_blocks:
        c.eval = c.eval[: data_cfg.max_eval_blocks]
    return c


@functools.lru_cache(maxsize=4)
def global_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def micro_batch(
    blocks: torch.Tensor,
    step: int,
    micro: int,
    rank: int,
    world: int,
    micro_batch_size: int,
    batch_size: int,
    seed: int,
) -> torch.Tensor:
    """Rank `rank`'s micro-batch `micro` of optimizer step `step` (0-based)."""
    n = blocks.shape[0]
    start = step * batch_size + (micro * world + rank) * micro_batch_size
    idx = []
    for pos in range(start, start + micro_batch_size):
        epoch, i = divmod(pos, n)
        idx.append(int(global_order(n, seed, epoch)[i]))
    return blocks[idx]
