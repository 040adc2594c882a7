"""Model classes for pruned shapes that transformers' own classes refuse.

`dsee_gpt2`: GPT-2 with fewer attention heads than n_embd / head_dim.

transformers' GPT-2 derives head_dim from n_embd / n_head (and its prune_heads is gone in v5),
so a head-pruned GPT-2 needs its own class. This one is GPT-2 with an explicit `head_dim`:
attention width n_head x head_dim (c_attn: n_embd -> 3 x width, c_proj: width -> n_embd).
`dsee_llama`: LLaMA whose head count does not divide hidden_size (transformers' config refuses
that although its attention reads head_dim from the config); only used where needed.
`import dsee_scale` registers both with AutoConfig / AutoModelForCausalLM, so a pruned export
loads with `AutoModelForCausalLM.from_pretrained(dir)`.

This file is also the remote code a pruned export carries (copied as modeling_dsee.py, with an
auto_map in config.json), so that `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it where dsee_scale is not installed: it imports nothing but
torch, transformers and huggingface_hub (tests/test_export.py checks it).
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D


class DSEEGPT2Config(GPT2Config):
    model_type = "dsee_gpt2"

    def __init__(self, head_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.head_dim = head_dim if head_dim is not None else self.n_embd // self.n_head


class PrunedGPT2Attention(GPT2Attention):
    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.split_size = self.num_heads * self.head_dim  # the attention width
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = False
        self.layer_idx = layer_idx
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(3 * self.split_size, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.split_size)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True


class DSEEGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = DSEEGPT2Config

    def __init__(self, config: DSEEGPT2Config):
        # build GPT-2 with one head (always valid), then put the pruned attention in
        stand_in = copy.deepcopy(config)
        stand_in.n_head = 1
        super().__init__(stand_in)
        config._attn_implementation = stand_in._attn_implementation
        self.config = config
        self.transformer.config = config
        for i, block in enumerate(self.transformer.h):
            block.attn = PrunedGPT2Attention(config, layer_idx=i)
        self.post_init()


@strict
class DSEELlamaConfig(LlamaConfig):
    """A LLaMA config whose head count need not divide hidden_size (head_dim is explicit), which
    transformers' own config refuses; used only for such pruned models."""

    model_type = "dsee_llama"

    def validate_architecture(self):
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )


class DSEELlamaForCausalLM(LlamaForCausalLM):
    config_class = DSEELlamaConfig


REMOTE_MODULE = "modeling_dsee"  # an export carries this file as modeling_dsee.py

# arch name -> (config class, model class name) of the pruned shapes transformers refuses
CUSTOM_CLASSES = {
    "gpt2": (DSEEGPT2Config, "DSEEGPT2LMHeadModel"),
    "llama": (DSEELlamaConfig, "DSEELlamaForCausalLM"),
}


def register() -> None:
    for name, cfg, model in (
        ("dsee_gpt2", DSEEGPT2Config, DSEEGPT2LMHeadModel),
        ("dsee_llama", DSEELlamaConfig, DSEELlamaForCausalLM),
    ):
        try:
            AutoConfig.register(name, cfg)
            AutoModelForCausalLM.register(cfg, model)
        except ValueError:  # already registered
            pass
