"""Injection into tiny random GPT-2 and LLaMA models; merge, counts, adapter save/load."""

import pytest
import torch

from dsee_scale.adapters import (
    DSEEConfig,
    DSEELayer,
    adapter_state_dict,
    expected_trainable_count,
    inject,
    load_adapter,
    merge,
    save_adapter,
    supports_of,
    trainable_parameter_count,
    unmerge,
)
from dsee_scale.adapters.inject import target_shape
from dsee_scale.adapters.layer import delta_name
from dsee_scale.errors import ConfigError

from helpers import randomize_dsee, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def fresh(kind):
    return tiny_gpt2() if kind == "gpt2" else tiny_llama()


def test_default_targets_are_q_and_v(tiny_model):
    kind, model = tiny_model
    targets = inject(model, DSEEConfig(r=4, num_sparse=8, support="magnitude"))
    keys = sorted(t.key for t in targets)
    if kind == "gpt2":
        assert keys == [f"transformer.h.{i}.attn.c_attn:{s}" for i in range(2) for s in "qv"]
    else:
        assert keys == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    layers = [n for n, m in model.named_modules() if isinstance(m, DSEELayer)]
    assert len(layers) == (2 if kind == "gpt2" else 4)


def test_only_dsee_parameters_train_and_count_is_exact(tiny_model):
    kind, model = tiny_model
    cfg = DSEEConfig(r=4, num_sparse=8, support="magnitude")
    targets = inject(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "sparse_values") for n in trainable)
    # q and v: out x in = hidden x hidden (GPT-2, LLaMA q) and kv_dim x hidden (LLaMA GQA v)
    shapes = [(32, 32), (32, 32)] * 2 if kind == "gpt2" else [(32, 32), (16, 32)] * 2
    expected = sum(4 * (o + i) + 8 for o, i in shapes)
    assert trainable_parameter_count(model) == expected == expected_trainable_count(model, targets, cfg)


def test_logits_unchanged_at_init_and_merge_matches(tiny_model):
    kind, model = tiny_model
    with torch.no_grad():
        before = model(IDS).logits
    inject(model, DSEEConfig(r=4, num_sparse=8, support="grebsmo", grebsmo_rounds=3))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before)  # B = 0, S = 0
        randomize_dsee(model)
        live = model(IDS).logits
        assert (live - before).abs().max() > 1e-3
        merge(model)
        torch.testing.assert_close(model(IDS).logits, live, rtol=1e-4, atol=1e-4)
        unmerge(model)
        torch.testing.assert_close(model(IDS).logits, live, rtol=1e-5, atol=1e-5)


def test_explicit_patterns_and_slices():
    model = tiny_gpt2()
    targets = inject(
        model,
        DSEEConfig(r=2, num_sparse=4, support="random", target_modules=["h.1.attn.c_attn:k", "mlp.c_fc"]),
    )
    assert sorted(t.key for t in targets) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn:k",
        "transformer.h.1.mlp.c_fc",
    ]
    model = tiny_llama()
    targets = inject(
        model, DSEEConfig(r=2, num_sparse=4, support="random", target_modules=["layers.*.mlp.*_proj"])
    )
    assert len(targets) == 6


def test_adapter_roundtrip_reproduces_logits(tiny_model, tmp_path):
    kind, model = tiny_model
    inject(model, DSEEConfig(r=4, num_sparse=8, support="svd"))
    randomize_dsee(model)
    with torch.no_grad():
        want = model(IDS).logits
    save_adapter(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_model.safetensors", "dsee_config.json"]
    # small: only A, B, S values and indices
    assert set(k.rsplit(".", 1)[1] for k in adapter_state_dict(model)) == {
        "lora_A",
        "lora_B",
        "sparse_values",
        "sparse_index",
    }

    base = fresh(kind)  # same seed -> same base weights; supports come from the file
    load_adapter(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(base(IDS).logits, want)
    for k, v in supports_of(model).items():
        assert torch.equal(supports_of(base)[k], v)


def test_supports_are_deterministic_for_a_seed():
    a, b = tiny_llama(), tiny_llama()
    inject(a, DSEEConfig(num_sparse=16, support="grebsmo", grebsmo_rounds=2, seed=3))
    inject(b, DSEEConfig(num_sparse=16, support="grebsmo", grebsmo_rounds=2, seed=3))
    for k, v in supports_of(a).items():
        assert torch.equal(supports_of(b)[k], v)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(target_modules=["nothing_here"]), "matches no module"),
        (dict(target_modules=["embed_tokens"]), "Embedding"),
        (dict(num_sparse=10**6), "larger than"),
        (dict(target_modules=["layers.0.self_attn.q_proj:q"]), "not a fused q/k/v"),
    ],
)
def test_bad_targets_name_the_problem(cfg, match):
    with pytest.raises(ConfigError, match=match):
        inject(tiny_llama(), DSEEConfig(**cfg))


def test_whole_and_slice_of_one_module_is_refused():
    with pytest.raises(ConfigError, match="whole and by slice"):
        inject(tiny_gpt2(), DSEEConfig(target_modules=["c_attn", "h.0.attn.c_attn:q"]))


def test_num_sparse_zero_trains_low_rank_only(tiny_model):
    kind, model = tiny_model
    targets = inject(model, DSEEConfig(r=4, num_sparse=0, support="grebsmo"))
    assert trainable_parameter_count(model) == expected_trainable_count(
        model, targets, DSEEConfig(r=4, num_sparse=0)
    )
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(g.numel() == 0 for n, g in grads.items() if n.endswith("sparse_values"))


def test_sparse_density_sets_n_per_matrix_and_stays_o_of_n(tiny_model):
    """dsee.sparse_density: N = round(density x rows x cols) for each target, stored as N values
    (never a dense S), through the same code as num_sparse; the sparse part trains."""
    kind, model = tiny_model
    cfg = DSEEConfig(r=2, sparse_density=0.03, support="grebsmo")
    targets = inject(model, cfg)
    assert trainable_parameter_count(model) == expected_trainable_count(model, targets, cfg)
    for t in targets:
        rows, cols = target_shape(model, t)
        values = model.get_parameter(f"{delta_name(t.module, t.slice)}.sparse_values")
        assert values.numel() == round(0.03 * rows * cols) > 0
    randomize = {n: p for n, p in model.named_parameters() if ".lora_B" in n}
    with torch.no_grad():
        for p in randomize.values():
            p.normal_()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("sparse_values")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_sparse_density_out_of_range_is_refused(density):
    from dsee_scale.config import from_dict

    with pytest.raises(ConfigError, match=r"dsee.sparse_density: got .*, must be in \[0, 1\]"):
        from_dict(DSEEConfig, {"sparse_density": density}, "dsee")
