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
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TypedDict

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
from . import gguf

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


class ShardWriter:
    """Safetensors shards of at most max_bytes, then model.safetensors.index.json."""

    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str], on_flush=None):
        self.out, self.max_bytes, self.metadata, self.on_flush = out, max_bytes, metadata, on_flush
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(path), metadata=self.metadata)
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        if self.on_flush is not None:
            self.on_flush()

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
            )


def merged_tensors(ck: ZeroCheckpoint, dsee: DSEEConfig, layers: LayerLayout, tied: bool):
    """(name, tensor, source dtype) of the merged model in the checkpoint's order, one at a time."""
    for name in ck.names():
        if is_dsee_name(name):
            continue  # folded into its layer's weight below
        if tied and name == "lm_head.weight":
            continue
        module, _, leaf = name.rpartition(".")
        if module.endswith("." + BASE):
            layer = module[: -len(BASE) - 1]
            out_name = f"{layer}.{leaf}"
            t = ck.tensor(name)
            if leaf == "weight" and layer in layers:
                info = layers[layer]
                w = t.float()
                w_oi = w.t() if info["kind"] == "conv1d" else w  # out x in view
                with torch.no_grad():
                    for s, (lo, hi) in info["slices"].items():
                        d = ck.dsee_delta(delta_name(layer, s), dsee)
                        w_oi[lo:hi] += kept_update(d, w_oi[lo:hi]) if dsee.keep_zeros else d.delta_weight()
                yield out_name, w, ck.dtype_of(name)
            else:
                yield out_name, t, ck.dtype_of(name)
        else:
            yield name, ck.tensor(name), ck.dtype_of(name)


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
    writer = ShardWriter(tmp, max_bytes, {"format": "pt"}, on_flush=ck.release)
    total = sum(1 for n in ck.names() if not is_dsee_name(n) and not (tied and n == "lm_head.weight"))
    zeros = block_numel = 0
    for i, (name, t, _) in enumerate(merged_tensors(ck, dsee, layers, tied)):
        t = t.to(out_dtype) if t.is_floating_point() else t
        if t.dim() == 2 and (arch is None or arch.block_index(name) is not None):  # blocks' matrices
            zeros += t.numel() - int(torch.count_nonzero(t))
            block_numel += t.numel()
        writer.add(name, t)
        if progress is not None:
            progress(i + 1, total)
    writer.finish()
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
        "bytes": writer.total,
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
