"""ZeRO-3 checkpoint -> a Hugging Face model directory (merged) or a DSEE adapter.

merged:  W + (alpha/r)(BA + S) folded per layer, written as sharded safetensors with
         model.safetensors.index.json, config.json, generation_config.json and the tokenizer.
         `AutoModelForCausalLM.from_pretrained(out)` loads it with no dsee_scale installed.
adapter: A, B, S values and indices + dsee_config.json: `load_adapter(base_model, out)`.

Streaming: tensors are read one at a time from the memory-mapped checkpoint and written in
shards of at most --max-shard-size, so memory holds one shard plus one layer. Everything is
written to a temporary directory beside out_dir and renamed at the end: an interrupted export
leaves no half-written model, and an existing non-empty out_dir is replaced only with force.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, TypedDict

import torch

from ..adapters.config import DSEEConfig
from ..adapters.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..adapters.layer import BASE, MARKER, delta_name, is_dsee_name, kept_update
from ..archs import BY_MODEL_TYPE, FULL
from ..checkpoint import ZeroCheckpoint
from ..checkpoint.format import LayerLayout
from ..config import from_dict
from ..errors import UserError
from ..models import ModelConfig, load_config
from . import gguf, shards

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ExportSummary(TypedDict, total=False):
    """What an export wrote (also saved as dsee_export.json beside the model)."""

    files: list[str]
    bytes: int
    frozen_dtype: str
    trainable_dtype: str
    written_dtype: str
    update_rounded_to_written_dtype: bool
    tokenizer: bool
    block_weight_zero_fraction: float  # the real sparsity of what was written
    tied_embeddings: bool
    architectures: list[str]  # as config.json names them (what serving stacks and llama.cpp read)
    self_contained: bool  # a pruned shape that carries its modeling code (trust_remote_code)
    gguf_files: list[str]
    format: str
    checkpoint: str
    tag: str
    mode: str
    world_size: int


def parse_size(text: str) -> int:
    """'500MB' / '2GB' (powers of 1000) or '512MiB' / '2GiB' (powers of 1024) in bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m or (m.group(3) and not m.group(2)):
        raise UserError(f"--max-shard-size: {text!r} is not a size such as 500MB, 2GB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


class Source(NamedTuple):
    """One tensor of the merged model: its output name, its name in the checkpoint, and the
    DSEE layer whose update folds into it (None: copied as saved)."""

    out: str
    name: str
    layer: str | None


def merged_sources(ck: ZeroCheckpoint, layers: LayerLayout, tied: bool) -> list[Source]:
    """The merged model's tensors in the checkpoint's order (DSEE's own parameters fold into
    their layer's weight; a tied lm_head is left to the embedding)."""
    out = []
    for name in ck.names():
        if is_dsee_name(name) or (tied and name == "lm_head.weight"):
            continue
        module, _, leaf = name.rpartition(".")
        if module.endswith("." + BASE):
            layer = module[: -len(BASE) - 1]
            merged = leaf == "weight" and layer in layers
            out.append(Source(f"{layer}.{leaf}", name, layer if merged else None))
        else:
            out.append(Source(name, name, None))
    return out


def merged_weight(ck: ZeroCheckpoint, dsee: DSEEConfig, layers: LayerLayout, src: Source) -> torch.Tensor:
    """W + (alpha/r)(BA + S) of one DSEE layer's weight, in float32."""
    assert src.layer is not None
    info = layers[src.layer]
    w = ck.tensor(src.name).float()
    w_oi = w.t() if info["kind"] == "conv1d" else w  # out x in view
    with torch.no_grad():
        for s, (lo, hi) in info["slices"].items():
            d = ck.dsee_delta(delta_name(src.layer, s), dsee)
            w_oi[lo:hi] += kept_update(d, w_oi[lo:hi]) if dsee.keep_zeros else d.delta_weight()
    return w


def merged_tensors(ck: ZeroCheckpoint, dsee: DSEEConfig, layers: LayerLayout, tied: bool):
    """(name, tensor, source dtype) of the merged model in the checkpoint's order, one at a time."""
    for src in merged_sources(ck, layers, tied):
        t = ck.tensor(src.name) if src.layer is None else merged_weight(ck, dsee, layers, src)
        yield src.out, t, ck.dtype_of(src.name)


def name_architecture(cfg, out: Path) -> bool:
    """Name the model class in the config, as transformers' save_pretrained does (serving
    stacks and llama.cpp's converter pick the class from it). A pruned shape that needs our
    class (dsee_gpt2 / dsee_llama) carries it: modeling_dsee.py and an auto_map, so
    `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` needs only transformers.
    Returns whether the export carries code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..pruning import pruned_models

    model_class: type = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # type: ignore[assignment]
    cfg.architectures = [model_class.__name__]
    if type(cfg).__module__ != pruned_models.__name__:
        return False
    module = pruned_models.REMOTE_MODULE
    shutil.copyfile(pruned_models.__file__, out / f"{module}.py")
    cfg.auto_map = {"AutoConfig": f"{module}.{type(cfg).__name__}",
                    "AutoModelForCausalLM": f"{module}.{model_class.__name__}"}  # fmt: skip
    return True


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"output directory {str(out)!r} is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _commit(tmp: Path, out: Path) -> None:
    """Swap the finished export into place; the old directory goes only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    tag: str | None = None,
    mode: str = "merged",
    dtype: str = "auto",
    max_shard_size: str = "2GB",
    force: bool = False,
    progress=None,
    *,
    fmt: str = "safetensors",
    gguf_types: str = "f16",
) -> ExportSummary:
    """Export; returns a summary (files, bytes, dtypes). fmt="gguf" (merged, LLaMA family)
    converts the merged model to one GGUF file per type in gguf_types (gguf.py)."""
    if mode not in ("merged", "adapter"):
        raise UserError(f"--mode: got {mode!r}, allowed: merged, adapter")
    if fmt not in ("safetensors", "gguf"):
        raise UserError(f"--format: got {fmt!r}, allowed: safetensors, gguf")
    if fmt == "gguf" and mode != "merged":
        raise UserError("--format gguf: only a merged model converts to GGUF (not --mode adapter)")
    types = gguf.parse_types(gguf_types) if fmt == "gguf" else []
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype: got {dtype!r}, allowed: auto, {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    out = Path(out_dir)
    ck = ZeroCheckpoint(ckpt_dir, tag)
    exp = ck.experiment()
    dsee = from_dict(DSEEConfig, exp.get("dsee"), "dsee")
    tmp = _prepare_out(out, force)
    try:
        if mode == "adapter":
            summary = _write_adapter(ck, exp, dsee, tmp, dtype)
        elif fmt == "gguf":  # the merged model in a scratch directory, converted beside it
            hf = tmp / ".merged"
            hf.mkdir()
            summary = _write_merged(ck, exp, dsee, hf, dtype, max_bytes, progress)
            summary["gguf_files"] = gguf.convert(hf, tmp, types, tmp)
            shutil.rmtree(hf)
            summary["files"] = sorted(p.name for p in tmp.iterdir())
            summary["bytes"] = sum((tmp / f).stat().st_size for f in summary["gguf_files"])
        else:
            summary = _write_merged(ck, exp, dsee, tmp, dtype, max_bytes, progress)
        summary.update({"checkpoint": str(ck.dir), "tag": ck.tag, "mode": mode, "world_size": ck.world,
                        "format": fmt})  # fmt: skip
        (tmp / "dsee_export.json").write_text(json.dumps(summary, indent=2))
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _write_adapter(ck: ZeroCheckpoint, exp: dict, dsee: DSEEConfig, tmp: Path, dtype: str) -> ExportSummary:
    from safetensors.torch import save_file

    want = None if dtype == "auto" else DTYPES[dtype]
    state = {}
    for name in ck.names():
        if is_dsee_name(name):
            t = ck.tensor(name)
            if want is not None and t.is_floating_point():
                t = t.to(want)
            state[name] = t.contiguous()
    if not state:
        raise UserError(f"{str(ck.dir)!r} holds no DSEE parameters")
    save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "dsee_scale": "adapter"})

    def target_of(name: str) -> str:  # "<layer>.dsee.q.lora_A" -> "<layer>:q"
        layer, _, rest = name.partition(MARKER)
        slice_name = rest.split(".")[0]
        return layer if slice_name == FULL else f"{layer}:{slice_name}"

    targets = sorted({target_of(n) for n in state})
    model_type = (exp.get("model", {}).get("config") or {}).get("model_type")
    (tmp / ADAPTER_CONFIG).write_text(
        json.dumps({"dsee": exp["dsee"], "targets": targets, "model_type": model_type}, indent=2)
    )
    return {
        "files": sorted(p.name for p in tmp.iterdir()),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "trainable_dtype": "fp32",
        "written_dtype": dtype if want is not None else "fp32",
    }


def _write_merged(
    ck: ZeroCheckpoint, exp: dict, dsee: DSEEConfig, tmp: Path, dtype: str, max_bytes: int, progress
) -> ExportSummary:
    from transformers import GenerationConfig

    from ..models import load_tokenizer

    mc = from_dict(ModelConfig, exp.get("model"), "model")
    cfg = load_config(mc)
    layers = ck.meta["dsee_layers"]
    arch = BY_MODEL_TYPE.get(cfg.model_type)  # None: count every matrix as a block's
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    frozen_dtypes = {ck.dtype_of(n) for n in ck.frozen_shapes}
    frozen_dtype = frozen_dtypes.pop() if len(frozen_dtypes) == 1 else torch.float32
    out_dtype = frozen_dtype if dtype == "auto" else DTYPES[dtype]
    sources = merged_sources(ck, layers, tied)
    planned = []
    for src in sources:
        src_dtype = ck.dtype_of(src.name)
        planned.append(shards.Planned(src.out, tuple(ck.shape_of(src.name)),
                                      out_dtype if src_dtype.is_floating_point else src_dtype))  # fmt: skip
    is_block = {e.name: len(e.shape) == 2 and (arch is None or arch.block_index(e.name) is not None)
                for e in planned}  # fmt: skip

    def produce(i: int) -> tuple[list[torch.Tensor], int]:
        """Tensor i as pieces in its written dtype, and its zeros (blocks' matrices only)."""
        src, want = sources[i], planned[i].dtype
        if src.layer is None:
            parts = [p if p.dtype == want else p.to(want) for p in ck.pieces(src.name)]
        else:
            parts = [merged_weight(ck, dsee, layers, src).to(want).reshape(-1)]
        zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in parts) if is_block[src.out] else 0
        return parts, zeros

    results = shards.ahead(produce, range(len(planned)))
    zeros = done = 0

    def pieces(n: int):
        """The next n tensors' pieces, counting their zeros and reporting progress."""
        nonlocal zeros, done
        for _ in range(n):
            parts, z = next(results)
            zeros += z
            done += 1
            yield parts
            if progress is not None:
                progress(done, len(planned))

    files = shards.plan_shards(planned, max_bytes)
    names = shards.file_names(len(files))
    for entries, fname in zip(files, names):
        shards.write_file(tmp / fname, entries, pieces(len(entries)), {"format": "pt"})
        ck.release()  # let go of the pages read for this file
    total = sum(e.nbytes for e in planned)
    if len(files) > 1:
        weight_map = {e.name: fname for entries, fname in zip(files, names) for e in entries}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    block_numel = sum(math.prod(e.shape) for e in planned if is_block[e.name])
    cfg.dtype = out_dtype
    self_contained = name_architecture(cfg, tmp)
    cfg.save_pretrained(tmp)
    try:
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
    except Exception:  # a config without generation fields: nothing to write
        pass
    tok = load_tokenizer(mc)
    if tok is not None:
        tok.save_pretrained(tmp)
    rounded = out_dtype != torch.float32
    return {
        "files": sorted(p.name for p in tmp.iterdir()),
        "bytes": total,
        "frozen_dtype": DTYPE_NAMES.get(frozen_dtype, str(frozen_dtype)),
        "trainable_dtype": "fp32",
        "written_dtype": DTYPE_NAMES.get(out_dtype, str(out_dtype)),
        "update_rounded_to_written_dtype": rounded,
        "tokenizer": tok is not None,
        # the real sparsity of what was written: merging refills pruned zeros on updated rows
        "block_weight_zero_fraction": zeros / block_numel if block_numel else 0.0,
        "tied_embeddings": tied,
        "architectures": list(cfg.architectures),
        "self_contained": self_contained,
    }
