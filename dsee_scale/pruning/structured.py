"""Structured pruning: whole attention heads and MLP channels, a uniform count per layer.

A plan says, per layer, which q heads, which kv heads and which MLP channels are KEPT. It is
made from scores (scores.py) and applied by surgery (surgery.py), then the config is updated:

- LLaMA (q/k/v/o_proj, GQA): q heads are pruned evenly inside every kv group, so
  num_attention_heads stays a multiple of num_key_value_heads (or whole kv groups go, with
  their q heads). head_dim is written into the config explicitly. No custom class is needed.
- GPT-2 (fused c_attn, Conv1D): the q, k and v columns of a head go together with c_proj's rows;
  the result is a `dsee_gpt2` model (pruned_models.py) since GPT-2 derives head_dim from n_embd.
- MLP channels: rows of gate/up (c_fc) and columns of down (c_proj); intermediate_size / n_inner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .surgery import keep_inputs, keep_outputs


@dataclass
class LayerPlan:
    q_heads: list[int]  # kept q heads
    kv_heads: list[int]  # kept kv heads (== q_heads without GQA)
    channels: list[int] | None = None  # kept MLP channels (None: all)


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": [vars(lp) for lp in self.layers]}


def _cfg(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def arch(model_or_config) -> str:
    c = _cfg(model_or_config)
    if c.model_type in ("gpt2", "dsee_gpt2"):
        return "gpt2"
    if hasattr(c, "num_key_value_heads") and hasattr(c, "intermediate_size"):
        return "llama"
    raise ValueError(f"structured pruning supports GPT-2 and LLaMA-style models, not {c.model_type!r}")


def dims(model_or_config) -> tuple[int, int, int, int]:
    """(num q heads, num kv heads, head_dim, intermediate size) of a model or config."""
    c = _cfg(model_or_config)
    if arch(c) == "gpt2":
        hd = getattr(c, "head_dim", None) or c.n_embd // c.n_head
        return c.n_head, c.n_head, hd, c.n_inner or 4 * c.n_embd
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, hd, c.intermediate_size


def num_layers(model_or_config) -> int:
    c = _cfg(model_or_config)
    return c.n_layer if arch(c) == "gpt2" else c.num_hidden_layers


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


def blocks(model):
    return model.transformer.h if arch(model) == "gpt2" else model.model.layers


def apply_plan(model, plan: Plan) -> None:
    """Remove the heads / channels the plan does not keep; update the config. In place."""
    kind = arch(model)
    H, KV, hd, inter = dims(model)
    nq, nkv, nch = plan_sizes(plan, inter)
    for block, lp in zip(blocks(model), plan.layers):
        prune_block(block, kind, lp, H, hd)
    new = pruned_config(model.config, nq, nkv, hd, nch)
    model.config = new
    (model.transformer if kind == "gpt2" else model.model).config = new
    if kind == "gpt2":
        for block in blocks(model):
            block.attn.config = new


def plan_sizes(plan: Plan, inter: int) -> tuple[int, int, int]:
    """(q heads, kv heads, channels) that every layer keeps; refuses non-uniform plans."""
    counts = {(len(lp.q_heads), len(lp.kv_heads)) for lp in plan.layers}
    ch_counts = {len(lp.channels) if lp.channels is not None else inter for lp in plan.layers}
    if len(counts) != 1 or len(ch_counts) != 1:
        raise ValueError("a plan must keep the same number of heads / channels in every layer")
    (nq, nkv), (nch,) = counts.pop(), ch_counts
    if nq % nkv:
        raise ValueError(f"{nq} q heads do not split evenly over {nkv} kv heads")
    return nq, nkv, nch


def prune_block(block, kind: str, lp: LayerPlan, H: int, hd: int) -> None:
    """Surgery on one decoder block (plain or DSEE-injected), in place."""
    nq, nkv = len(lp.q_heads), len(lp.kv_heads)
    if kind == "gpt2":
        attn, mlp = block.attn, block.mlp
        width = H * hd
        rows = [r for part in range(3) for r in _rows(lp.q_heads, hd, part * width)]
        attn.c_attn = keep_outputs(attn.c_attn, rows)
        attn.c_proj = keep_inputs(attn.c_proj, _rows(lp.q_heads, hd))
        attn.num_heads, attn.split_size = nq, nq * hd
        if lp.channels is not None:
            mlp.c_fc = keep_outputs(mlp.c_fc, lp.channels)
            mlp.c_proj = keep_inputs(mlp.c_proj, lp.channels)
        return
    attn, mlp = block.self_attn, block.mlp
    attn.q_proj = keep_outputs(attn.q_proj, _rows(lp.q_heads, hd))
    attn.k_proj = keep_outputs(attn.k_proj, _rows(lp.kv_heads, hd))
    attn.v_proj = keep_outputs(attn.v_proj, _rows(lp.kv_heads, hd))
    attn.o_proj = keep_inputs(attn.o_proj, _rows(lp.q_heads, hd))
    attn.num_key_value_groups = nq // nkv
    if hasattr(attn, "num_heads"):
        attn.num_heads = nq
    if lp.channels is not None:
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, keep_outputs(getattr(mlp, name), lp.channels))
        mlp.down_proj = keep_inputs(mlp.down_proj, lp.channels)


def pruned_config(c, nq: int, nkv: int, hd: int, nch: int):
    """A new config with the pruned sizes: standard where transformers allows it, else the
    registered dsee_gpt2 / dsee_llama type (pruned_models.py)."""
    from .pruned_models import DSEEGPT2Config, DSEELlamaConfig

    d = c.to_dict()
    for k in ("model_type", "transformers_version", "architectures"):
        d.pop(k, None)
    if arch(c) == "gpt2":
        d.update(n_head=nq, head_dim=hd, n_inner=nch)
        new, archs = DSEEGPT2Config(**d), ["DSEEGPT2LMHeadModel"]
    else:
        d.update(num_attention_heads=nq, num_key_value_heads=nkv, head_dim=hd, intermediate_size=nch)
        if c.hidden_size % nq == 0:  # still a standard LLaMA-family config
            new, archs = type(c)(**d), list(c.architectures or [])
        else:
            new, archs = DSEELlamaConfig(**d), ["DSEELlamaForCausalLM"]
    new._attn_implementation = c._attn_implementation
    new.architectures = archs
    return new


def mask_hooks(model, plan: Plan):
    """The reference for tests: the UNPRUNED model with the pruned heads' and channels' inputs to
    the output projections zeroed (forward pre-hooks). Returns the hook handles."""
    H, KV, hd, inter = dims(model)
    handles = []

    def zeroing(keep: list[int], size: int):
        mask = torch.zeros(size)
        mask[keep] = 1.0

        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
        return hook

    for block, lp in zip(blocks(model), plan.layers):
        attn = block.attn if arch(model) == "gpt2" else block.self_attn
        o = attn.c_proj if arch(model) == "gpt2" else attn.o_proj
        handles.append(o.register_forward_pre_hook(zeroing(_rows(lp.q_heads, hd), H * hd)))
        if lp.channels is not None:
            down = block.mlp.c_proj if arch(model) == "gpt2" else block.mlp.down_proj
            handles.append(down.register_forward_pre_hook(zeroing(lp.channels, inter)))
    return handles
