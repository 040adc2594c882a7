"""Unstructured pruning: scores against the dense formulas, exact ratios, masks that stay."""

import pytest
import torch

from dsee_scale.adapters import DSEEConfig, inject, merge
from dsee_scale.adapters.layer import weight_out_in
from dsee_scale.pruning import unstructured as U

from helpers import randomize_dsee, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def model_with_dsee(kind="llama"):
    m = tiny_llama() if kind == "llama" else tiny_gpt2()
    inject(m, DSEEConfig(r=2, num_sparse=10, support="magnitude"))
    randomize_dsee(m, scale=0.2)
    return m


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_abs_and_wabs_follow_the_dense_formula(kind):
    m = model_with_dsee(kind)
    layers = U.prunable(m)
    s_abs, s_wabs, s_mag = (U.scores(layers, k) for k in ("abs", "wabs", "magnitude"))
    for name, layer in layers.items():
        base = layer.base_layer if hasattr(layer, "base_layer") else layer
        W = weight_out_in(base).detach().float()
        if not hasattr(layer, "dsee"):
            torch.testing.assert_close(s_abs[name], W.abs() / W.abs().median())
            assert torch.equal(s_wabs[name], W.abs())
            continue
        for sl, d in layer.dsee.items():  # independent dense reference of (alpha/r)(BA + S)
            lo, hi = layer.bounds(sl)
            S = torch.zeros(hi - lo, W.shape[1])
            S[d.sparse_index[0], d.sparse_index[1]] = d.sparse_values.detach()
            delta = d.scaling * (d.lora_B.detach() @ d.lora_A.detach() + S)
            # ABS is relative to each slice's own scale (divided by its median)
            torch.testing.assert_close(s_abs[name][lo:hi], delta.abs() / delta.abs().median())
            torch.testing.assert_close(s_wabs[name][lo:hi], (W[lo:hi] + delta).abs())
        torch.testing.assert_close(s_mag[name], W.abs())


def test_wanda_uses_input_column_norms():
    m = model_with_dsee()
    layers = U.prunable(m, ["down_proj"])
    norms = U.input_norms(m, layers, [IDS])
    xs = []
    h = layers["model.layers.0.mlp.down_proj"].register_forward_pre_hook(lambda mod, a: xs.append(a[0]))
    m(input_ids=IDS)
    h.remove()
    want = xs[0].reshape(-1, xs[0].shape[-1]).norm(dim=0)
    torch.testing.assert_close(norms["model.layers.0.mlp.down_proj"], want, rtol=1e-5, atol=1e-6)
    s = U.scores(layers, "wanda", norms)["model.layers.0.mlp.down_proj"]
    w = layers["model.layers.0.mlp.down_proj"].weight.detach()
    torch.testing.assert_close(s, w.abs() * want[None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_masks_prune_exactly_the_ratio(scope, ratio):
    m = model_with_dsee()
    layers = U.prunable(m)
    keep = U.masks(U.scores(layers, "wabs"), ratio, scope)
    total = sum(k.numel() for k in keep.values())
    pruned = sum(int((~k).sum()) for k in keep.values())
    rounding = {"global": 1, "layer": len(keep), "row": sum(k.shape[0] for k in keep.values())}
    assert abs(pruned - ratio * total) <= rounding[scope]
    if scope == "layer":
        for k in keep.values():
            assert abs(int((~k).sum()) - ratio * k.numel()) <= 1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        U.masks(U.scores(layers, "magnitude"), 1.0)


def test_row_scope_removes_each_rows_lowest_scores():
    """Wanda's comparison group: every output row loses exactly its own lowest scores."""
    m = model_with_dsee()
    layers = U.prunable(m)
    score = U.scores(layers, "magnitude")
    keep = U.masks(score, 0.5, "row")
    for name, s in score.items():
        k = keep[name]
        assert (k.sum(1) == s.shape[1] - round(0.5 * s.shape[1])).all(), name
        for r in range(s.shape[0]):  # every kept score >= every pruned score of the same row
            assert s[r][k[r]].min() >= s[r][~k[r]].max()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_keep_the_n_best_of_every_m_consecutive_inputs(nm):
    n, m_ = nm
    m = model_with_dsee()
    layers = U.prunable(m)
    score = U.scores(layers, "wabs")
    keep = U.masks(score, 0.0, nm=nm)
    for name, s in score.items():
        k = keep[name]
        for r in range(s.shape[0]):
            for g in range(0, s.shape[1], m_):
                grp, kg = s[r, g : g + m_], k[r, g : g + m_]
                assert int(kg.sum()) == n
                assert grp[kg].min() >= grp[~kg].max()
    odd = {"w": torch.rand(4, 6)}
    with pytest.raises(ValueError, match="6 input columns, not a multiple of 4"):
        U.masks(odd, 0.5, nm=(2, 4))


def test_abs_under_global_scope_does_not_prune_the_targeted_rows_first():
    """A tuned update is much smaller than W: raw |update| pooled with |W| put every q, v row
    first in line. Relative ABS prunes the targeted rows about as much as the others."""
    m = model_with_dsee()
    randomize_dsee(m, scale=1e-3)
    layers = U.prunable(m)
    keep = U.masks(U.scores(layers, "abs"), 0.5, "global")
    targeted = [k for n, k in keep.items() if hasattr(layers[n], "dsee")]
    frac = sum(int((~k).sum()) for k in targeted) / sum(k.numel() for k in targeted)
    assert 0.3 < frac < 0.7, frac


def test_masks_survive_retuning_and_merging_refills_unless_masked():
    m = model_with_dsee()
    layers = U.prunable(m)
    keep = U.masks(U.scores(layers, "magnitude"), 0.5)
    U.apply_masks(layers, keep)
    rep = U.sparsity_report(layers)
    assert rep["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # re-tune A, B, S with the pruned W frozen
        m(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert U.sparsity_report(layers)["weight_sparsity"] == rep["weight_sparsity"]
    assert U.sparsity_report(layers)["merged_sparsity"] < rep["weight_sparsity"]  # B A is dense
    with torch.no_grad():
        before = m(input_ids=IDS).logits
    merge(m)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4)
    U.mask_merged(layers, keep)
    assert U.sparsity_report(layers)["merged_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("given", ["dict", "pairs"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_streamed_global_threshold_equals_the_sorted_one(ratio, kind, given):
    """Global masks from two bit-pattern histograms, one block's scores at a time (a dict, or
    (name, scores) pairs one matrix at a time as each_score yields them), equal the masks of
    sorting all scores at once, ties included (-0.0 and 0.0 too)."""
    g = torch.Generator().manual_seed(7)
    shapes = [[(6, 10), (3, 10)], [(8, 4)], [(5, 7), (7, 5), (2, 2)]]
    blocks = []
    for shp in shapes:
        if kind == "ties":  # few distinct values: many ties across blocks and matrices
            blocks.append(
                {f"m{j}": torch.randint(0, 5, s, generator=g).float() / 4 for j, s in enumerate(shp)}
            )
            for m in blocks[-1].values():
                m[(m == 0) & (torch.rand(m.shape, generator=g) < 0.5)] = -0.0  # some zeros are -0.0
        else:
            scale = [
                10.0 ** int(torch.randint(-8, 3, (1,), generator=g)) for _ in shp
            ]  # very different scales
            blocks.append({f"m{j}": torch.rand(s, generator=g) * scale[j] for j, s in enumerate(shp)})
    calls = []

    def score_of_block(i):
        calls.append(i)
        return blocks[i] if given == "dict" else ((k, v.clone()) for k, v in blocks[i].items())

    got = U.streamed_global_masks(score_of_block, len(blocks), ratio)
    flat = {f"{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}
    want = U.masks(flat, ratio, "global")
    for key, m in want.items():
        i, name = key.split("/")
        assert torch.equal(got[int(i)][name], m), key
    assert max(calls.count(i) for i in range(len(blocks))) <= 4
    with pytest.raises(ValueError, match="non-negative"):
        U.streamed_global_masks(lambda i: {"m": -torch.ones(2, 2)}, 1, 0.5)


def test_streamed_global_threshold_split_over_ranks_equals_one_rank():
    """Two ranks (threads with an in-process all-gather) score disjoint blocks; both end with
    the masks of sorting every score at once."""
    import threading

    g = torch.Generator().manual_seed(11)
    blocks = [{f"m{j}": torch.randint(0, 6, (5, 8), generator=g).float() for j in range(2)} for _ in range(5)]
    world, slots, barrier = 2, {}, threading.Barrier(2)
    calls: dict[int, list[int]] = {0: [], 1: []}

    sent = []

    def gather_for(rank):
        def gather(x):
            sent.append(x)
            barrier.wait()
            slots[rank] = x
            barrier.wait()
            out = [slots[r] for r in range(world)]
            barrier.wait()
            return out

        return gather

    results = {}

    def run(rank):
        def score_of_block(i):
            calls[rank].append(i)
            return blocks[i]

        mine = list(range(rank, len(blocks), world))
        results[rank] = U.streamed_global_masks(score_of_block, len(blocks), 0.45, mine, gather_for(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # only histograms and counts travel, never masks: each rank computes any block's masks itself
    assert not any(isinstance(v, dict) for x in sent if isinstance(x, dict) for v in x.values()), sent
    want = U.masks({f"{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}, 0.45, "global")
    for rank in range(world):
        assert set(calls[rank]) == set(range(rank, len(blocks), world))  # only its own blocks
        for key, m in want.items():
            i, name = key.split("/")
            assert torch.equal(results[rank][int(i)][name], m), (rank, key)
