"""The DeepSpeed side: fill the engine JSON from the experiment and the accelerator, build the
partitioned model, and create the engine.

Values the experiment YAML owns (batch sizes, lr, weight decay, clipping, precision) are "auto"
in ds_configs/ and come from the YAML. Values that depend on the accelerator are "auto" too
and chosen here (`accelerator_settings`):

                          GPU (CUDA, NCCL)                 DeepSpeed's CPU accelerator (gloo)
  optimizer               FusedAdam; DeepSpeedCPUAdam      torch AdamW; DeepSpeedCPUAdam with
                          with optimizer offload           optimizer offload
  overlap_comm            true                             false (no streams to overlap)
  offload pin_memory      true (faster host<->GPU copies)  false (nothing to pin for)
  ZeRO-3 buckets          from the hidden size h, as transformers' integration does:
                          reduce_bucket_size h*h, stage3_prefetch_bucket_size 0.9*h*h,
                          stage3_param_persistence_threshold 10*h
A fixed value in the JSON is kept; one that disagrees with the YAML is an error.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

from .. import zero
from ..errors import ConfigError
from ..experiment import ExperimentConfig
from ..zero import comm


def _fill(node: dict, key: str, value, yaml_key: str, source: str) -> None:
    """Set an "auto" value; a fixed value that disagrees with the YAML is an error."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(
            f"{source}: {key}={current!r} conflicts with {yaml_key}={value!r}; "
            f'set it to "auto" or make them equal'
        )


def deepspeed_config(
    exp: ExperimentConfig, world_size: int, hidden_size: int | None = None, accelerator: str | None = None
) -> dict:
    """The engine JSON with its "auto" values filled in from the experiment YAML and the
    accelerator (its name, e.g. "cuda" or "cpu"; default: DeepSpeed's accelerator)."""
    path = exp.deepspeed
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed: cannot read {path!r}: {e}") from None
    t = exp.train
    per_step = t.micro_batch_size * world_size
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is not a multiple of micro_batch_size "
            f"x ranks = {t.micro_batch_size} x {world_size}"
        )
    _fill(ds, "train_batch_size", t.batch_size, "train.batch_size", path)
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _fill(
        ds,
        "gradient_accumulation_steps",
        t.batch_size // per_step,
        "train.batch_size / (micro_batch_size x ranks)",
        path,
    )
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", path)
    for name, on in (("bf16", t.precision == "bf16"), ("fp16", t.precision == "fp16")):
        ds.setdefault(name, {})
        _fill(ds[name], "enabled", on, "train.precision", path)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", t.lr, "train.lr", path)
        _fill(params, "weight_decay", t.weight_decay, "train.weight_decay", path)
    zero_cfg = ds.get("zero_optimization", {})
    for part in ("offload_optimizer", "offload_param"):
        off = zero_cfg.get(part)
        if off and off.get("device") == "nvme":
            if not exp.nvme_path:
                raise ConfigError(
                    f"nvme_path: {path} offloads to NVMe; set nvme_path to a directory on a fast local disk"
                )
            Path(exp.nvme_path).mkdir(parents=True, exist_ok=True)
            _fill(off, "nvme_path", exp.nvme_path, "nvme_path", path)
            preload_libaio()
    accelerator_settings(ds, accelerator or _accelerator_name(), hidden_size)
    return ds


def _accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def accelerator_settings(ds: dict, accelerator: str, hidden_size: int | None) -> None:
    """Fill the accelerator-dependent "auto" values (the table in the module docstring)."""
    gpu = accelerator != "cpu"
    zero_cfg = ds.get("zero_optimization", {})
    offload_optimizer = bool(zero_cfg.get("offload_optimizer", {}).get("device", "none") != "none")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        if params.get("torch_adam") == "auto":  # False: FusedAdam, or CPU Adam when offloaded
            params["torch_adam"] = not gpu and not offload_optimizer
    if zero_cfg.get("overlap_comm") == "auto":
        zero_cfg["overlap_comm"] = gpu
    for part in ("offload_optimizer", "offload_param"):
        if zero_cfg.get(part, {}).get("pin_memory") == "auto":
            zero_cfg[part]["pin_memory"] = gpu
    h = hidden_size
    for key, value, fallback in (
        ("reduce_bucket_size", h * h if h else None, int(5e8)),
        ("stage3_prefetch_bucket_size", int(0.9 * h * h) if h else None, int(5e7)),
        ("stage3_param_persistence_threshold", 10 * h if h else None, int(1e5)),
    ):
        if zero_cfg.get(key) == "auto":
            zero_cfg[key] = value if value is not None else fallback


def preload_libaio() -> None:
    """DeepSpeed builds its async_io op for the CPU accelerator without linking libaio
    (AsyncIOBuilder.extra_ldflags returns only -fopenmp there), so loading it fails with
    'undefined symbol: io_submit'. Loading libaio globally first resolves the symbols."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("aio") or "libaio.so.1"
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise ConfigError(
            "NVMe offload needs libaio (apt-get install libaio-dev, then bash scripts/setup.sh)"
        ) from None


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def frozen_dtype(exp: ExperimentConfig) -> Literal["float32", "bfloat16", "float16"]:
    """The dtype the run holds its frozen weights in (its precision's, else model.dtype)."""
    if exp.train.precision == "bf16":
        return "bfloat16"
    if exp.train.precision == "fp16":
        return "float16"
    return exp.model.dtype


def frozen_model_config(exp: ExperimentConfig):
    """exp.model with the dtype the frozen weights are held in."""
    mc = copy.copy(exp.model)
    mc.dtype = frozen_dtype(exp)
    return mc


def build_model(exp: ExperimentConfig, ds: dict):
    """The base model, partitioned while it loads under ZeRO-3 (never a full copy per rank)."""
    from ..models import dequantized_once_per_node, load_model

    mc = frozen_model_config(exp)
    if comm.rank_and_world()[1] > 1:  # a GGUF: dequantized by one rank per node, then loaded by all
        mc = dequantized_once_per_node(
            mc, int(os.environ.get("LOCAL_RANK", 0)), exp.train.collective_timeout_s
        )
    if zero_stage(ds) == 3:
        zero.partitioned_loading(copy.deepcopy(ds))
        model = load_into_partitions(mc, ds)
        if model is not None:
            return model
    return load_model(mc)


def blank_model(exp: ExperimentConfig, ds: dict):
    """The model of exp.model.config for a caller that writes every parameter itself (a pruned
    build): under ZeRO-3 partitioned with nothing initialised (initialising a 7B model under
    zero.Init costs minutes); otherwise built as build_model builds it."""
    from ..models import partitioned_skeleton

    if zero_stage(ds) != 3 or exp.model.config is None:
        return build_model(exp, ds)
    zero.partitioned_loading(copy.deepcopy(ds))
    model = partitioned_skeleton(frozen_model_config(exp))
    model.tie_weights()
    return model  # in training mode, as from_config builds it


def load_into_partitions(mc, ds: dict):
    """A model directory's weights under ZeRO-3, each rank reading only its own partition of
    every parameter from the safetensors files (plain reads of its bytes), with no gather and no
    collective: O(model / world) per rank. (transformers' from_pretrained under ZeRO-3 reads
    every tensor on rank 0 and gathers each layer to write it.) None where this does not apply
    (no safetensors, an architecture outside archs.py, parameter offload to NVMe, a tensor the
    files name otherwise): then from_pretrained loads it."""
    from ..archs import BY_MODEL_TYPE
    from ..checkpoint.base import BaseWeights, name_in
    from ..models import load_config, partitioned_skeleton, resolve_preset

    src = resolve_preset(mc)
    offload = ds.get("zero_optimization", {}).get("offload_param") or {}
    if offload.get("device") == "nvme" or src.path is None:
        return None
    if not any(Path(str(src.path)).glob("*.safetensors")):
        return None
    if load_config(src).model_type not in BY_MODEL_TYPE:
        return None
    try:
        base = BaseWeights(src, src.dtype)
    except Exception:  # unreadable files (many error types): from_pretrained names them in one line
        return None
    model = partitioned_skeleton(src)
    model.tie_weights()  # tied parameters are one parameter, read once
    names = {n: name_in(base, n) for n, _ in model.named_parameters()}
    if any(b is None or base.shape(b) != zero.full_shape(p) for (n, p), b in
           zip(model.named_parameters(), names.values())):  # fmt: skip
        return None
    zero.fill_own_partitions(model, lambda n, start, end: base.flat_range(str(names[n]), start, end))
    with torch.no_grad():
        for n, buf in model.named_buffers():  # persistent buffers the files hold (others are computed)
            b = name_in(base, n)
            if b is not None:
                buf.copy_(base.tensor(b))
    return model.eval()


def lr_scheduler_factory(t, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.schedule]

    def make(optimizer):
        return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)

    return make


def create_engine(model, ds: dict, exp: ExperimentConfig, total_steps: int) -> tuple[Any, Any, Any]:
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds,
        lr_scheduler=lr_scheduler_factory(exp.train, total_steps),
    )
    return engine, optimizer, scheduler


def enable_gradient_checkpointing(model) -> None:
    """Reentrant checkpointing: works with ZeRO-3 and frozen weights (the non-reentrant
    variant can fail there); inputs must require grad since the embeddings are frozen."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def trainable_count(model) -> int:
    return sum(zero.full_numel(p) for p in model.parameters() if p.requires_grad)
