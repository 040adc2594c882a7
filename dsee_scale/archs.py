"""One table of architecture facts: where the blocks, projections and embeddings of each decoder
family live, and how its config names head counts and sizes.

Every module that needs to know "GPT-2 or LLaMA" asks `arch_of(model_or_config)` and reads
the answer here, instead of branching on model_type strings:

    GPT-2 (transformers GPT2LMHeadModel)       LLaMA family (LlamaForCausalLM, SmolLM2, ...)
    transformer.h.<i>                          model.layers.<i>
      attn.c_attn   Conv1D, fused q|k|v          self_attn.q_proj / k_proj / v_proj   Linear
      attn.c_proj   Conv1D                       self_attn.o_proj
      mlp.c_fc -> mlp.c_proj                     mlp.gate_proj, mlp.up_proj -> mlp.down_proj
    wte + wpe (token + position embeddings)    embed_tokens (rotary positions inside attention)

A projection is written "module[:slice]": "attn.c_attn:q" is the q third of GPT-2's fused
projection, "self_attn.q_proj" a whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

FULL = "full"  # a whole projection (not a slice of a fused one)


class Dims(NamedTuple):
    """Sizes of a decoder: q heads, kv heads, head dim, MLP width, layers, hidden size."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    hidden: int


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]  # config.model_type values of this family (ours included)
    blocks: str  # dotted path of the decoder blocks (a ModuleList)
    q: str  # projections, relative to a block, "module[:slice]"
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # projections whose output rows are the MLP channels
    mlp_out: str  # the projection whose input columns are the MLP channels
    embeddings: tuple[str, ...]  # what feeds block 0: token [, position] embedding weights
    attention: str  # the attention module of a block
    heads_key: str  # config keys
    kv_heads_key: str | None  # None: as many kv heads as q heads
    intermediate_key: str
    layers_key: str
    hidden_key: str
    default_targets: tuple[str, ...]  # DSEE's q and v (as the authors and PEFT do)
    lm_class: str  # transformers' causal-LM class (config.architectures)
    config_has_head_dim: bool  # the config carries head_dim (else it is hidden / heads)
    rotary_emb: str | None  # the rotary-embedding module (None: learned position embeddings)

    def dims(self, config: Any) -> Dims:
        c = config
        heads = getattr(c, self.heads_key)
        kv = getattr(c, self.kv_heads_key) if self.kv_heads_key else heads
        hidden = getattr(c, self.hidden_key)
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        inter = getattr(c, self.intermediate_key, None) or 4 * hidden  # GPT-2's n_inner=None
        return Dims(heads, kv, head_dim, inter, getattr(c, self.layers_key), hidden)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)  # type: ignore[return-value]

    def block_prefix(self, i: int) -> str:
        """Parameter-name prefix of block i, e.g. 'model.layers.3.'."""
        return f"{self.blocks}.{i}."

    def block_index(self, name: str) -> int | None:
        """The block a parameter / module name belongs to, or None (embeddings, head)."""
        head = self.blocks + "."
        if not name.startswith(head):
            return None
        index = name[len(head) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None


GPT2 = Arch(
    name="gpt2",
    model_types=("gpt2", "dsee_gpt2"),
    blocks="transformer.h",
    q="attn.c_attn:q",
    k="attn.c_attn:k",
    v="attn.c_attn:v",
    o="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
    attention="attn",
    heads_key="n_head",
    kv_heads_key=None,
    intermediate_key="n_inner",
    layers_key="n_layer",
    hidden_key="n_embd",
    default_targets=("c_attn:q", "c_attn:v"),
    lm_class="GPT2LMHeadModel",
    config_has_head_dim=False,
    rotary_emb=None,
)

LLAMA = Arch(
    name="llama",
    model_types=("llama", "dsee_llama"),
    blocks="model.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    embeddings=("model.embed_tokens.weight",),
    attention="self_attn",
    heads_key="num_attention_heads",
    kv_heads_key="num_key_value_heads",
    intermediate_key="intermediate_size",
    layers_key="num_hidden_layers",
    hidden_key="hidden_size",
    default_targets=("q_proj", "v_proj"),
    lm_class="LlamaForCausalLM",
    config_has_head_dim=True,
    rotary_emb="model.rotary_emb",
)

ARCHS = (GPT2, LLAMA)
BY_MODEL_TYPE = {t: a for a in ARCHS for t in a.model_types}


def config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def arch_of(model_or_config: Any) -> Arch:
    """The facts for a model or config; a clear ValueError for families we do not know."""
    model_type = getattr(config_of(model_or_config), "model_type", None)
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type]


def split_projection(spec: str) -> tuple[str, str]:
    """'attn.c_attn:q' -> ('attn.c_attn', 'q'); 'self_attn.q_proj' -> ('self_attn.q_proj', 'full')."""
    module, _, part = spec.partition(":")
    return module, part or FULL
