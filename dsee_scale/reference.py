"""Independent references that tests and the device check compare dsee-scale's runs with:

- `plain_reference(config)`: the same DSEE experiment trained in plain PyTorch (no DeepSpeed,
  one process, torch AdamW, the same data order and schedule): its losses, supports and
  trained A, B, S values;
- `deepspeed_params(ckpt_dir)`: every parameter of a ZeRO-3 checkpoint as DeepSpeed's own
  zero_to_fp32 consolidates it (not our reader);
- `rebuilt(ckpt_dir)`: the trained DSEE model of a checkpoint, rebuilt with plain transformers
  from that consolidation (the model an export must reproduce).
"""

from __future__ import annotations

from pathlib import Path

import torch


def deepspeed_params(ckpt_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint, consolidated by DeepSpeed's own zero_to_fp32 (the
    independent reference for our reader, export and training)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def rebuilt(ckpt_dir: Path, model_path: Path | None = None):
    """The trained DSEE model of a checkpoint, rebuilt with plain transformers from DeepSpeed's
    own consolidation (the reference for export and pruning): the base from model_path, or from
    the checkpoint's model config (random-config and pruned models)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .adapters import DSEEConfig, inject
    from .checkpoint import ZeroCheckpoint
    from .models import ModelConfig, load_config

    ck = ZeroCheckpoint(ckpt_dir)
    exp = ck.experiment()
    if model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(load_config(ModelConfig(config=exp["model"]["config"])))
    inject(model, DSEEConfig(**exp["dsee"]), load_file(str(ck.dir / "dsee_supports.safetensors")))
    state = deepspeed_params(ck.dir.parent, tag=ck.tag)
    if "base" not in ck.meta:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.eval()
    # checkpoint.frozen_base: DeepSpeed's files hold no frozen weights; model_path gave them
    if model_path is None:
        raise ValueError("a checkpoint that references its base needs model_path")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or not set(missing) <= set(ck.frozen_shapes) | set(ck.shared):
        raise ValueError(f"consolidation does not fit the model: {unexpected or missing}")
    return model.eval()


def plain_reference(config: Path) -> tuple[dict[int, float], dict, dict[str, torch.Tensor]]:
    """The same DSEE run in plain PyTorch (no DeepSpeed): the losses, the supports, and the
    trained A, B and S values."""
    from transformers import get_scheduler

    from .adapters import adapter_state_dict, inject, supports_of
    from .data import ByteTokenizer, build_corpus, micro_batch
    from .experiment import load_experiment
    from .models import load_model, load_tokenizer

    exp = load_experiment(str(config))
    t = exp.train
    if exp.data is None or t.max_steps is None:
        raise ValueError("plain_reference needs a data section and train.max_steps")
    torch.manual_seed(t.seed)
    model = load_model(exp.model)
    inject(model, exp.dsee)
    corpus = build_corpus(exp.data, load_tokenizer(exp.model) or ByteTokenizer())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    sched = get_scheduler(t.schedule, opt, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    accum = t.batch_size // t.micro_batch_size
    model.train()
    out = {}
    for step in range(t.max_steps):
        total = 0.0
        for micro in range(accum):
            batch = micro_batch(corpus.train, step, micro, 0, 1, t.micro_batch_size, t.batch_size, t.seed)
            loss = model(**batch, use_cache=False).loss
            (loss / accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out[step + 1] = total / accum
    trained = {k: v.detach().clone() for k, v in adapter_state_dict(model).items() if "sparse_index" not in k}
    return out, {k: v.clone() for k, v in supports_of(model).items()}, trained
