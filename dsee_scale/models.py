"""Loading the base model: a local HF directory, a GGUF file, or a config for random weights."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ConfigError, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """The `model:` section. Exactly one of preset / path / gguf_file / config."""

    preset: Literal["smollm2-135m"] | None = None  # a real model that needs no hub (assets.py)
    path: str | None = None  # a local Hugging Face model directory
    gguf_file: str | None = None  # a .gguf file (dequantized on load; needs `gguf`)
    config: dict[str, Any] | None = None  # transformers config kwargs incl. model_type
    tokenizer: str | None = None  # a tokenizer directory or .gguf file, if not beside the model
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0  # for random weights

    def validate(self, section: str = "model") -> None:
        given = [k for k in ("preset", "path", "gguf_file", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{section}: give exactly one of preset, path, gguf_file, config "
                f"(got {', '.join(given) or 'none'})"
            )
        for key in ("path", "gguf_file", "tokenizer"):
            value = getattr(self, key)
            if value is not None:
                value = os.path.expanduser(value)
                setattr(self, key, value)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{section}.{key}: {value!r} does not exist")
        if self.gguf_file is not None and not Path(self.gguf_file).is_file():
            raise ConfigError(f"{section}.gguf_file: {self.gguf_file!r} is not a file")
        if self.config is not None and "model_type" not in self.config:
            raise ConfigError(f"{section}.config: needs a model_type (e.g. gpt2, llama)")


def resolve_preset(cfg: ModelConfig) -> ModelConfig:
    """preset -> the concrete source it stands for (fetched once if needed)."""
    if cfg.preset == "smollm2-135m":
        from .assets import smollm2_gguf

        return dataclasses.replace(cfg, preset=None, gguf_file=str(smollm2_gguf()))
    return cfg


def build_config(cfg: ModelConfig):
    from transformers import AutoConfig

    kwargs = dict(cfg.config or {})
    model_type = kwargs.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.config: {e}") from None


def _from_pretrained(auto_class, mc: ModelConfig, **kwargs):
    """auto_class.from_pretrained of a local directory or GGUF file, with a one-line error that
    names the key when the files are missing or corrupt."""
    try:
        if mc.path is not None:
            return auto_class.from_pretrained(mc.path, **kwargs)
        gguf = Path(str(mc.gguf_file))
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return auto_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    except Exception as e:  # missing / corrupt files: the readers raise many exception types
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if mc.path is not None:
            raise UserError(f"model.path: cannot load {mc.path!r}: {why}") from None
        raise UserError(f"model.gguf_file: {mc.gguf_file!r} is not a readable GGUF model: {why}") from None


def _drop_gguf_quantization(config) -> None:
    """GGUF weights are dequantized on load; their quantization_config would block
    save_pretrained later."""
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config


def load_config(cfg: ModelConfig):
    """The model's transformers config alone (no weights): from `config`, a directory's
    config.json or a GGUF's metadata."""
    from transformers import AutoConfig

    mc = resolve_preset(cfg)
    config = build_config(mc) if mc.config is not None else _from_pretrained(AutoConfig, mc)
    _drop_gguf_quantization(config)
    return config


def load_model(cfg: ModelConfig):
    """The causal LM described by cfg, on CPU, in cfg.dtype (frozen weights stay in it)."""
    from transformers import AutoModelForCausalLM

    mc = resolve_preset(cfg)
    dtype = DTYPES[mc.dtype]
    if mc.config is not None:
        torch.manual_seed(mc.seed)
        return AutoModelForCausalLM.from_config(build_config(mc), dtype=dtype)
    model = _from_pretrained(AutoModelForCausalLM, mc, dtype=dtype)
    if mc.gguf_file is not None:
        _drop_gguf_quantization(model.config)
        setattr(model, "hf_quantizer", None)  # noqa: B010 (transformers' attribute, not a Module's)
    return model


def partitioned_skeleton(cfg: ModelConfig):
    """The model of cfg's directory (or of cfg.config) built under ZeRO-3's zero.Init with no
    weights read and none initialised (each rank's partitions are empty until filled): what
    `from_pretrained` builds before it loads, made by the same init contexts. Filled by
    `engine.build_model`, or by a pruned build (pruning.run.build_pruned)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils.generic import ContextManagers

    config = AutoConfig.from_pretrained(str(cfg.path)) if cfg.config is None else build_config(cfg)
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with ContextManagers(model_class.get_init_context(DTYPES[cfg.dtype], False, False, None)):
        model = model_class(config)
    return model


def dequantized_once_per_node(cfg: ModelConfig, local_rank: int, timeout_s: int = 3600) -> ModelConfig:
    """A GGUF model as a safetensors directory that the node's local rank 0 writes once (the
    dequantization runs there alone, whole-model in memory once per node) and every rank then
    loads like any model directory: memory-mapped, and partitioned under ZeRO-3. Cached under
    $DSEE_SCALE_CACHE (default ~/.cache/dsee_scale)/models by the file's path, size, mtime and
    dtype; the others wait up to `timeout_s`. Other models come back unchanged."""
    import hashlib
    import shutil
    import time

    mc = resolve_preset(cfg)
    if mc.gguf_file is None:
        return cfg
    g = Path(mc.gguf_file).resolve()
    st = g.stat()
    key = hashlib.sha256(f"{g}:{st.st_size}:{st.st_mtime_ns}:{mc.dtype}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("DSEE_SCALE_CACHE", Path.home() / ".cache" / "dsee_scale")) / "models"
    d = root / f"{g.stem}-{mc.dtype}-{key}"
    if local_rank == 0 and not (d / "config.json").is_file():
        tmp = root / f".{d.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        load_model(mc).save_pretrained(str(tmp), safe_serialization=True)
        try:
            os.replace(tmp, d)  # atomic: a reader never sees half a directory
        except OSError:  # another node's rank 0 (shared filesystem) was first
            shutil.rmtree(tmp, ignore_errors=True)
    waited = 0.0
    while not (d / "config.json").is_file():
        if waited > timeout_s:
            raise UserError(f"model.gguf_file: the node's local rank 0 did not write the dequantized "
                            f"model {str(d)!r} within {timeout_s} s")  # fmt: skip
        time.sleep(0.5)
        waited += 0.5
    return dataclasses.replace(mc, gguf_file=None, path=str(d), tokenizer=mc.tokenizer or str(g))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, or None where there is none (a random model, a directory without
    tokenizer files): the caller then uses byte-level tokens."""
    from transformers import AutoTokenizer

    cfg = resolve_preset(cfg)
    source = cfg.tokenizer or cfg.path
    try:
        if source is not None and str(source).endswith(".gguf"):  # a tokenizer inside a GGUF
            g = Path(source)
            tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        elif source is not None:
            if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
                if cfg.tokenizer is not None:
                    raise ConfigError(
                        f"model.tokenizer: {source!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})"
                    )
                return None
            tok = AutoTokenizer.from_pretrained(source)
        elif cfg.gguf_file is not None:
            g = Path(cfg.gguf_file)
            tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        else:
            return None
    except (OSError, ValueError) as e:
        raise UserError(f"model: cannot load a tokenizer: {e}") from None
    # transformers can build an empty tokenizer from a bare config: refuse it, loudly
    if not tok("def f(): return 1")["input_ids"]:
        raise UserError(f"model: the tokenizer of {source or cfg.gguf_file!r} produces no tokens")
    return tok
