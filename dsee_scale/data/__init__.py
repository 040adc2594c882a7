"""Data -> tokenized rows of block_size tokens, built once with `datasets`, read per rank.

Sources and formats: sources.py (files, hub) and formats.py (text, prompt_completion, chat);
rows: packing.py. The build runs as `datasets` batched maps (records are streamed from the
files, never held as one Python list) and is saved as a memory-mapped Arrow dataset under a key
of the inputs (files, sizes, mtimes, tokenizer, block size, format settings) in
`data.cache_dir`, which may sit on a shared filesystem: a second run, a requeued job or another
node reads it instead of tokenizing again, and every rank reads only the rows it trains on.

Batches: the global order of rows is a permutation seeded by (seed, epoch); optimizer step s
takes the next `batch_size` rows, and rank r's micro-batch a of that step is a fixed slice of
them. The same global batch is therefore seen by 1 rank x 2 accumulation steps and by 2 ranks x 1,
and resuming at step s needs nothing but s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, UserError
from .formats import IGNORE, ByteTokenizer, chat_template_of, prompt_ids
from .packing import fit_lengths, pack_samples, pack_text, packing_mode, pad_samples
from .sources import expand_files, file_records, hub_records

if TYPE_CHECKING:  # experiment.py holds the config sections; it does not import data/
    from ..experiment import DataConfig

__all__ = [
    "IGNORE",
    "Blocks",
    "ByteTokenizer",
    "Corpus",
    "build_corpus",
    "chat_template_of",
    "batch_tokens",
    "micro_batch",
    "to_device",
    "packing_mode",
    "prompt_ids",
]

FORMAT_VERSION = 2  # bump when the rows built from the same inputs change
INFO = "dsee_info.json"


class Blocks:
    """Rows of block_size tokens (a memory-mapped `datasets.Dataset`): input_ids, labels, and
    position_ids (packed samples) or attention_mask (padded samples) where the format has them."""

    def __init__(self, ds: Any, info: dict[str, Any]):
        self.ds = ds.with_format("torch")
        self.info = info

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> Blocks:
        """Text rows from an (n, block_size) tensor of token ids, in memory (tests, benches)."""
        import datasets

        info = {"format": "text", "block_size": ids.shape[1], "samples": ids.shape[0], "dropped": 0,
                "truncated": 0, "packing": "concatenated"}  # fmt: skip
        return cls(datasets.Dataset.from_dict({"input_ids": ids.tolist()}), info)

    def __len__(self) -> int:
        return int(self.ds.num_rows)

    @property
    def block_size(self) -> int:
        return int(self.info["block_size"])

    def rows(self, idx: list[int] | range) -> dict[str, torch.Tensor]:
        """The model inputs of rows `idx` (int64): input_ids, labels[, position_ids | attention_mask]."""
        batch = {k: v.long() for k, v in self.ds[list(idx)].items()}
        if "labels" not in batch:  # text: every token is a label
            batch["labels"] = batch["input_ids"]
        return batch

    def head(self, n: int) -> Blocks:
        return Blocks(self.ds.select(range(min(n, len(self)))), self.info)

    def answer_tokens(self) -> int:
        """Tokens the loss is taken on (labels after the model's one-token shift)."""
        total = 0
        for start in range(0, len(self), 1024):
            labels = self.rows(range(start, min(start + 1024, len(self))))["labels"]
            total += int((labels[:, 1:] != IGNORE).sum())
        return total


def to_device(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The number of label tokens in a batch (what its mean loss is taken over)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class Corpus:
    train: Blocks
    eval: Blocks | None

    def describe(self) -> str:
        ev = 0 if self.eval is None else len(self.eval)
        i = self.train.info
        how = ""
        if i["format"] != "text":
            dropped = f", {i['dropped']} over-long dropped" if i["dropped"] else ""
            truncated = f", {i['truncated']} truncated" if i["truncated"] else ""
            how = f" ({i['format']}, {i['samples']} samples {i['packing']}{dropped}{truncated})"
        return f"{len(self.train)} train rows, {ev} eval rows of {self.train.block_size} tokens{how}"


def _cache_key(sources: list[str], tokenizer: Any, cfg: DataConfig, mode: str, template: str | None) -> str:
    h = hashlib.sha256()
    for s in sources:
        p = Path(s)
        st = p.stat() if p.exists() else None
        h.update(f"{p.resolve() if st else s}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("train_files", "eval_files", "cache_dir")}
    h.update(
        f"{FORMAT_VERSION}|{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}|"
        f"{getattr(tokenizer, 'vocab_size', '')}|{len(tokenizer) if hasattr(tokenizer, '__len__') else ''}|"
        f"{json.dumps(settings, sort_keys=True)}|{mode}|{template}".encode()
    )
    return h.hexdigest()[:24]


def _unwrap(e: BaseException) -> BaseException:
    """Our own error inside a `datasets` wrapper (DatasetGenerationError, map's re-raise)."""
    while e.__cause__ is not None or e.__context__ is not None:
        if isinstance(e, (UserError, ConfigError)):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e


def _build(records: Any, tokenizer: Any, cfg: DataConfig, mode: str, template: str | None, tmp: Path) -> Any:
    """records (a generator function) -> the rows dataset, with its build info."""
    import datasets

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    try:
        ds = datasets.Dataset.from_generator(records, cache_dir=str(tmp / "gen"), keep_in_memory=False)
        from .formats import tokenize_batch

        ds = ds.map(
            tokenize_batch,
            fn_kwargs={"tokenizer": tokenizer, "fmt": cfg.format, "template": template},
            batched=True,
            batch_size=256,
            remove_columns=[c for c in ds.column_names if c != "where"],
            cache_file_name=str(tmp / "tokens.arrow"),
            desc="tokenize",
        )
        n_samples = ds.num_rows
        dropped = truncated = 0
        if cfg.format == "text":
            rows = ds.map(
                pack_text, fn_kwargs={"block_size": cfg.block_size, "eos": eos}, batched=True,
                batch_size=2000, remove_columns=ds.column_names, cache_file_name=str(tmp / "rows.arrow"),
                desc="pack",
            )  # fmt: skip
        else:
            fit = ds.map(
                fit_lengths, fn_kwargs={"block_size": cfg.block_size, "overlong": cfg.overlong},
                batched=True, batch_size=1000, remove_columns=ds.column_names,
                cache_file_name=str(tmp / "fit.arrow"), desc="fit",
            )  # fmt: skip
            dropped = n_samples - fit.num_rows
            truncated = int(sum(fit["truncated"])) if fit.num_rows else 0
            fn = pack_samples if mode == "packed" else pad_samples
            rows = fit.map(
                fn, fn_kwargs={"block_size": cfg.block_size, "pad": eos}, batched=True,
                batch_size=1000, remove_columns=fit.column_names, cache_file_name=str(tmp / "rows.arrow"),
                desc="pack" if mode == "packed" else "pad",
            )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - datasets wraps what our functions raise
        inner = _unwrap(e)
        if isinstance(inner, (UserError, ConfigError)):
            raise inner from None
        raise
    features = rows.features.copy()
    for k in features:
        features[k] = datasets.Sequence(datasets.Value("int32"))
    rows = rows.cast(features)
    info = {
        "format": cfg.format, "block_size": cfg.block_size, "samples": n_samples, "dropped": dropped,
        "truncated": truncated, "packing": mode if cfg.format != "text" else "concatenated",
    }  # fmt: skip
    return rows, info


def load_rows(
    sources: list[str], records: Any, tokenizer: Any, cfg: DataConfig, mode: str, label: str
) -> Blocks:
    """The rows of one split, from the cache when the inputs did not change."""
    import datasets

    template = chat_template_of(tokenizer, cfg.chat_template) if cfg.format == "chat" else None
    cache = Path(cfg.cache_dir or Path.home() / ".cache" / "dsee_scale" / "data")
    path = cache / f"{label}-{_cache_key(sources, tokenizer, cfg, mode, template)}"
    if not (path / INFO).is_file():
        tmp = cache / f".{path.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            rows, info = _build(records, tokenizer, cfg, mode, template, tmp)
            if len(rows) == 0:
                raise UserError(
                    f"data: the {label} data holds fewer than block_size={cfg.block_size} tokens"
                    if cfg.format == "text"
                    else f"data: no {label} sample fits block_size={cfg.block_size} with an answer token"
                )
            rows.save_to_disk(str(tmp / "rows"))
            (tmp / "rows" / INFO).write_text(json.dumps(info))
            try:
                os.replace(tmp / "rows", path)  # atomic: a reader never sees half a cache
            except OSError:  # another job built the same key meanwhile: theirs is as good
                if not (path / INFO).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((path / INFO).read_text())
    return Blocks(datasets.load_from_disk(str(path)), info)


def build_corpus(data_cfg: DataConfig, tokenizer: Any, mode: str = "packed") -> Corpus:
    """Train / eval rows for an experiment's `data:` section. `mode` ('packed' / 'padded') is
    how prompt_completion and chat samples share rows (see packing_mode)."""
    from ..assets import split_of, stdlib_files

    mode = mode if data_cfg.packing else "padded"
    hub = data_cfg.hub_dataset
    if hub:

        def hub_split(split: str, label: str) -> Blocks:
            def records():
                yield from hub_records(hub, split, data_cfg)

            return load_rows([f"hub:{hub}:{split}"], records, tokenizer, data_cfg, mode, label)

        ev = hub_split(data_cfg.hub_eval_split, "eval") if data_cfg.hub_eval_split else None
        return _limit(Corpus(hub_split(data_cfg.hub_train_split, "train"), ev), data_cfg)
    if data_cfg.source == "python_stdlib":
        files = stdlib_files()
        train_files = [f for f in files if split_of(f, data_cfg.heldout_percent) == "train"]
        eval_files = [f for f in files if split_of(f, data_cfg.heldout_percent) == "heldout"]
    else:
        train_files = expand_files(data_cfg.train_files, "data.train_files")
        eval_files = expand_files(data_cfg.eval_files, "data.eval_files")

    def split(files: list[Path], label: str) -> Blocks:
        def records():
            yield from file_records(files, data_cfg)

        return load_rows([str(f) for f in files], records, tokenizer, data_cfg, mode, label)

    return _limit(
        Corpus(split(train_files, "train"), split(eval_files, "eval") if eval_files else None), data_cfg
    )


def _limit(c: Corpus, data_cfg: DataConfig) -> Corpus:
    if data_cfg.max_train_blocks:
        c.train = c.train.head(data_cfg.max_train_blocks)
    if c.eval is not None and data_cfg.max_eval_blocks:
        c.eval = c.eval.head(data_cfg.max_eval_blocks)
    return c


@functools.lru_cache(maxsize=4)
def global_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def batch_indices(
    n: int, step: int, micro: int, rank: int, world: int, micro_batch_size: int, batch_size: int, seed: int
) -> list[int]:
    """The rows of rank `rank`'s micro-batch `micro` of optimizer step `step` (0-based)."""
    start = step * batch_size + (micro * world + rank) * micro_batch_size
    idx = []
    for pos in range(start, start + micro_batch_size):
        epoch, i = divmod(pos, n)
        idx.append(int(global_order(n, seed, epoch)[i]))
    return idx


def micro_batch(
    blocks: Blocks,
    step: int,
    micro: int,
    rank: int,
    world: int,
    micro_batch_size: int,
    batch_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s micro-batch `micro` of optimizer step `step`: the model's keyword inputs."""
    return blocks.rows(
        batch_indices(len(blocks), step, micro, rank, world, micro_batch_size, batch_size, seed)
    )
