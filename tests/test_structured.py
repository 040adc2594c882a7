"""Structured pruning: surgery == masking, exact parameter counts, loadable results."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsee_scale.adapters import DSEEConfig, DSEELayer, inject, merge_and_unload
from dsee_scale.pruning import (
    apply_plan,
    channel_scores,
    collect_activations,
    head_scores,
    make_plan,
    mask_hooks,
)

from helpers import randomize_dsee, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_GPT2 = ["c_attn:q", "c_attn:v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]

CASES = {
    "gpt2": (lambda: tiny_gpt2(), ALL_GPT2, 1, "per_group"),
    "llama-mha": (lambda: tiny_llama(num_key_value_heads=4), ALL_LLAMA, 1, "per_group"),
    "llama-gqa": (
        lambda: tiny_llama(num_attention_heads=4, num_key_value_heads=2),
        ALL_LLAMA,
        1,
        "per_group",
    ),
    "llama-gqa-groups": (
        lambda: tiny_llama(num_attention_heads=4, num_key_value_heads=2),
        ALL_LLAMA,
        1,
        "kv_groups",
    ),
}


def dsee_model(case):
    build, targets, _, _ = CASES[case]
    model = build()
    inject(model, DSEEConfig(r=2, num_sparse=12, support="magnitude", target_modules=targets))
    randomize_dsee(model, scale=0.2)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_equals_masking(case):
    model = dsee_model(case)
    _, _, prune_heads, gqa = CASES[case]
    plan = make_plan(
        model,
        head_scores(model, "dsee"),
        prune_heads,
        channel_scores(model, "weight"),
        prune_channels=16,
        gqa=gqa,
    )
    masked = copy.deepcopy(model)
    handles = mask_hooks(masked, plan)
    with torch.no_grad():
        want = masked(IDS).logits
    for h in handles:
        h.remove()
    apply_plan(model, plan)
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the pruned model still trains through its (smaller) DSEE updates
    model(IDS).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert any(isinstance(m, DSEELayer) for m in model.modules())


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_count_and_plain_transformers_loading(case, tmp_path):
    model = dsee_model(case)
    _, _, prune_heads, gqa = CASES[case]
    plan = make_plan(
        model,
        head_scores(model, "weight"),
        prune_heads,
        channel_scores(model, "weight"),
        prune_channels=16,
        gqa=gqa,
    )
    apply_plan(model, plan)
    merge_and_unload(model)
    n = sum(p.numel() for p in model.parameters())
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert n == sum(p.numel() for p in fresh.parameters())
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-5, atol=1e-5)
    c = loaded.config
    if case == "gpt2":
        assert c.model_type == "dsee_gpt2" and c.n_head == 3 and c.n_inner == 128 - 16
    elif case == "llama-gqa":
        assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 2, 48)
    elif case == "llama-gqa-groups":
        assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)


def test_gqa_plans_keep_the_head_ratio_integral():
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    scores = torch.tensor([[4.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    plan = make_plan(model, scores, 1)  # one q head from every kv group
    assert [lp.q_heads for lp in plan.layers] == [[0, 3], [1, 3]]
    assert [lp.kv_heads for lp in plan.layers] == [[0, 1], [0, 1]]
    plan = make_plan(model, scores, 1, gqa="kv_groups")  # the weaker whole group
    assert [lp.q_heads for lp in plan.layers] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot remove 2 of the 2 q heads"):
        make_plan(model, scores, 2)


def test_activation_scores_come_from_calibration_batches():
    model = tiny_llama()
    acts = collect_activations(model, [IDS, IDS[:1]])
    hs, cs = head_scores(model, "activation", acts), channel_scores(model, "activation", acts)
    assert hs.shape == (2, 4) and cs.shape == (2, 64) and bool((hs > 0).all())


@pytest.mark.parametrize(
    "build,heads,channels,model_type,architecture",
    [
        (tiny_gpt2, 4, 96, "gpt2", "GPT2LMHeadModel"),  # channels only: GPT-2 computes the head size
        (tiny_gpt2, 3, 128, "dsee_gpt2", "DSEEGPT2LMHeadModel"),  # 3 heads of 8 in 32: our class
        (lambda: tiny_llama(num_key_value_heads=2), 2, 64, "llama", "LlamaForCausalLM"),  # explicit head_dim
        (lambda: tiny_llama(num_key_value_heads=3, num_attention_heads=6, hidden_size=48), 3, 64, "llama",
         "LlamaForCausalLM"),
        (lambda: tiny_llama(num_key_value_heads=4), 3, 64, "dsee_llama", "DSEELlamaForCausalLM"),  # 32 % 3
    ],
)  # fmt: skip
def test_the_pruned_config_is_standard_wherever_transformers_can_express_it(
    build, heads, channels, model_type, architecture
):
    from dsee_scale.archs import arch_of
    from dsee_scale.pruning.structured import pruned_config

    config = build().config
    dims = arch_of(config).dims(config)
    kv = heads if dims.kv_heads == dims.heads else dims.kv_heads
    new = pruned_config(config, heads, kv, dims.head_dim, channels)
    assert (new.model_type, new.architectures) == (model_type, [architecture])
    fresh = AutoModelForCausalLM.from_config(new)  # and the class builds those shapes
    assert arch_of(new).dims(new)[:4] == (heads, kv, dims.head_dim, channels)
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in build().parameters())
