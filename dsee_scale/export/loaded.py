"""A model to run, in memory: from an exported directory (plain transformers loading) or
straight from a training checkpoint, whose ZeRO-3 shards are read and merged the way `export`
reads them (merged_tensors), with no launcher and nothing written. Used by `dsee-scale generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def load_for_generation(source: str, tag: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, what) from an exported model directory or a training checkpoint
    (<output_dir>, <output_dir>/checkpoints or one step_N directory)."""
    from ..pruning import pruned_models

    pruned_models.register()  # pruned exports name our classes
    p = Path(source)
    if not p.exists():
        raise UserError(f"generate: {source!r} does not exist (give an export directory or a checkpoint)")
    if (p / "config.json").is_file() and not (p / "checkpoints").is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
        except Exception as e:  # corrupt / foreign directories: many exception types
            raise UserError(
                f"generate: cannot load the model in {source!r}: {type(e).__name__}: {e}"
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception:  # no tokenizer files: a random test model
            tok = None
        return model.eval(), tok, f"export {p}"
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    return merged_from_checkpoint(str(p), tag)


def merged_from_checkpoint(ckpt_dir: str, tag: str | None) -> tuple[Any, Any, str]:
    """The merged model of a ZeRO-3 checkpoint, built in memory from its shards."""
    from transformers import AutoModelForCausalLM

    from ..adapters.config import DSEEConfig
    from ..checkpoint import ZeroCheckpoint
    from ..config import from_dict
    from ..models import ModelConfig, load_config, load_tokenizer
    from . import merged_tensors

    ck = ZeroCheckpoint(ckpt_dir, tag)
    exp = ck.experiment()
    mc = from_dict(ModelConfig, exp.get("model"), "model")
    cfg = load_config(mc)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    dsee = from_dict(DSEEConfig, exp.get("dsee"), "dsee")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # buffers built here
    layers = ck.meta["dsee_layers"]
    state = {
        n: t.float() if t.is_floating_point() else t for n, t, _ in merged_tensors(ck, dsee, layers, tied)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(
            f"generate: {ckpt_dir!r} does not match its model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), load_tokenizer(mc), f"checkpoint {ck.dir}"
