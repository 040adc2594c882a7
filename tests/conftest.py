"""Shared fixtures: tiny random GPT-2 and LLaMA models built from configs (no hub)."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_gpt2(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64,
               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return request.param, (tiny_gpt2() if request.param == "gpt2" else tiny_llama())


def randomize_dsee(model, seed: int = 1, scale: float = 0.1):
    """Give B and S non-zero values so the update is visible (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".dsee." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
