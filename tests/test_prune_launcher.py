"""launchers/prune.py end to end: decisions across ranks, exact pruned model, masks that stay."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsee_scale.adapters import dsee_layers
from dsee_scale.adapters.layer import is_dsee_name
from dsee_scale.checkpoint import ZeroCheckpoint
from dsee_scale.data import ByteTokenizer, build_corpus, micro_batch
from dsee_scale.experiment import load_experiment
from dsee_scale.export import export_checkpoint
from dsee_scale.pruning import LayerPlan, Plan, mask_hooks

from helpers import (
    ROOT,
    check,
    launch,
    logits_without_dsee_scale,
    losses,
    rebuilt,
    save_tiny_model,
    write_config,
)

TARGETS = {"gpt2": ["c_attn:q", "c_attn:v", "mlp.c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    out = {"root": root}
    for kind in ("gpt2", "llama"):
        kw = {} if kind == "gpt2" else {"num_attention_heads": 4, "num_key_value_heads": 2}
        model = save_tiny_model(root, kind, **kw)
        cfg = write_config(
            root / f"{kind}.yaml",
            model,
            root / f"{kind}-tuned",
            root / "cache",
            dsee={"target_modules": TARGETS[kind]},
            train={"max_steps": 3},
        )
        check(launch(cfg, 1))
        out[kind] = (cfg, root / f"{kind}-tuned" / "checkpoints", model)
    return out


def calibration_batches(cfg, n):
    """The launcher's calibration batches (prune.calibration_batches=n), rebuilt independently."""
    exp = load_experiment(str(cfg))
    corpus = build_corpus(exp.data, ByteTokenizer())
    t = exp.train
    return [
        micro_batch(corpus.train, s, 0, 0, 1, t.micro_batch_size, t.micro_batch_size, t.seed)["input_ids"]
        for s in range(n)
    ]


def prune(cfg, ckpt, out, nproc, *overrides):
    r = check(
        launch(
            ROOT / "launchers" / "prune.py",
            nproc,
            "--from",
            str(ckpt),
            f"output_dir={out}",
            *overrides,
            config_path=cfg,
        )
    )
    return r, json.loads((out / "prune_plan.json").read_text())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_structured_prune_is_exact_and_the_same_on_one_and_two_ranks(tuned, kind):
    cfg, ckpt, model_path = tuned[kind]
    root = tuned["root"]
    args = ("prune.heads_per_layer=1", "prune.channels_per_layer=16", "train.max_steps=2")
    _, plan1 = prune(cfg, ckpt, root / f"{kind}-p1", 1, *args)
    _, plan2 = prune(cfg, ckpt, root / f"{kind}-p2", 2, *args)
    assert plan1["decision_digest"] == plan2["decision_digest"]
    assert plan1["decision"] == plan2["decision"]

    # step 1 of re-tuning computes its loss on the pruned model before any update: it must
    # equal the tuned model with the same heads / channels masked, on the same batch
    tuned_model = rebuilt(ckpt, model_path)
    plan = Plan([LayerPlan(**lp) for lp in plan1["decision"]["layers"]])
    mask_hooks(tuned_model, plan)
    exp = load_experiment(str(cfg))
    corpus = build_corpus(exp.data, ByteTokenizer())
    t = exp.train
    with torch.no_grad():
        want = sum(
            tuned_model(
                **micro_batch(corpus.train, 0, m, 0, 1, t.micro_batch_size, t.batch_size, t.seed)
            ).loss.item()
            for m in range(t.batch_size // t.micro_batch_size)
        ) / (t.batch_size // t.micro_batch_size)
    assert losses(root / f"{kind}-p1")[1] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert losses(root / f"{kind}-p2")[1] == pytest.approx(want, rel=1e-4, abs=1e-4)

    # the re-tuned, pruned checkpoint exports to a model plain transformers loads, with the
    # parameter count of its config and the framework's logits
    out = root / f"{kind}-export"
    export_checkpoint(str(root / f"{kind}-p2" / "checkpoints"), str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    fresh = AutoModelForCausalLM.from_config(loaded.config)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in fresh.parameters())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, rebuilt(root / f"{kind}-p2" / "checkpoints")(ids).logits, rtol=1e-4, atol=1e-4
        )


def test_unstructured_masks_survive_retuning_checkpoints_and_resume(tuned):
    """Pruned on one rank, resumed on two: the universal checkpoint carries only the trained
    parameters, so the pruned frozen weights are restored from the original one (each rank
    reads every other one and broadcasts it); the zeros are all there at the end."""
    cfg, ckpt, _ = tuned["llama"]
    root = tuned["root"]
    out = root / "sparse"
    prune(
        cfg,
        ckpt,
        out,
        1,
        "prune.kind=unstructured",
        "prune.ratio=0.5",
        "prune.scope=layer",
        "prune.score=wabs",
        "train.max_steps=4",
        "train.stop_at_step=2",
    )
    check(
        launch(
            ROOT / "launchers" / "prune.py",
            2,
            "--resume",
            f"output_dir={out}",
            "train.max_steps=4",
            config_path=cfg,
        )
    )
    assert sorted(losses(out)) == [1, 2, 3, 4]
    ck = ZeroCheckpoint(out / "checkpoints")
    assert ck.tag == "step_4"
    names = [
        n
        for n in ck.frozen_shapes
        if ".layers." in n and n.endswith("weight") and ck.frozen_shapes[n].numel() > 64
    ]  # the blocks' projection matrices
    assert names
    for n in names:
        w = ck.tensor(n)
        zeros = int((w == 0).sum())
        assert abs(zeros - 0.5 * w.numel()) <= 1, (n, zeros, w.numel())
    # the re-tuned update is masked by W's zeros (prune.keep_zeros), so merging keeps them all
    plan = json.loads((out / "prune_plan.json").read_text())
    assert plan["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    s = export_checkpoint(str(out / "checkpoints"), str(root / "sparse-export"))
    assert s["block_weight_zero_fraction"] == pytest.approx(0.5, abs=1e-3)


def test_a_requeued_retune_on_the_same_ranks_keeps_the_pruned_weights(tuned):
    """What a requeue of prune.sbatch does: --resume on the same number of ranks. The pruned frozen
    weights come back from the checkpoint (DeepSpeed restores frozen fragments on a same-size
    load) and the distillation teacher is rebuilt from the run's own record (prune_plan.json,
    experiment.yaml), so the run continues exactly as the uninterrupted one."""
    cfg, ckpt, _ = tuned["llama"]
    root = tuned["root"]
    args = ("prune.kind=unstructured", "prune.ratio=0.5", "prune.scope=row", "train.max_steps=4",
            "prune.distill.kl_weight=1")  # fmt: skip
    prune(cfg, ckpt, root / "requeue-full", 1, *args)
    prune(cfg, ckpt, root / "requeue", 1, *args, "train.stop_at_step=2")
    check(launch(ROOT / "launchers" / "prune.py", 1, "--resume", f"output_dir={root / 'requeue'}",
                 "train.max_steps=4", config_path=cfg))  # fmt: skip
    want, got = losses(root / "requeue-full"), losses(root / "requeue")
    assert sorted(got) == [1, 2, 3, 4]
    for s in (3, 4):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got, want)
    a, b = (
        ZeroCheckpoint(root / "requeue-full" / "checkpoints"),
        ZeroCheckpoint(root / "requeue" / "checkpoints"),
    )
    assert a.tag == b.tag == "step_4"
    for name in a.frozen_shapes:
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_nm_pattern_through_the_launcher(tuned):
    """prune.nm=2:4 (typed as a user would: YAML 1.1 would read 2:4 as 124): every group of four
    consecutive inputs of every block matrix keeps two weights, in the retuned checkpoint."""
    cfg, ckpt, _ = tuned["llama"]
    out = tuned["root"] / "nm"
    _, plan = prune(cfg, ckpt, out, 1, "prune.kind=unstructured", "prune.nm=2:4", "prune.score=magnitude",
                    "train.max_steps=1")  # fmt: skip
    assert plan["weight_sparsity"] == pytest.approx(0.5)
    ck = ZeroCheckpoint(out / "checkpoints")
    names = [
        n
        for n in ck.frozen_shapes
        if ".layers." in n and n.endswith("weight") and len(ck.frozen_shapes[n]) == 2
    ]
    assert names
    for n in names:
        w = ck.tensor(n).float()
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros == 2).all(), n


def test_gradual_schedule_by_pruning_a_pruned_run_again(tuned):
    cfg, ckpt, model_path = tuned["gpt2"]
    root = tuned["root"]
    _, first = prune(cfg, ckpt, root / "g1", 1, "prune.heads_per_layer=1", "train.max_steps=2")
    _, second = prune(
        cfg, root / "g1" / "checkpoints", root / "g2", 1, "prune.heads_per_layer=1", "train.max_steps=2"
    )
    assert first["config"]["n_head"] == 3 and second["config"]["n_head"] == 2
    out = root / "g2-export"
    export_checkpoint(str(root / "g2" / "checkpoints"), str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = rebuilt(root / "g2" / "checkpoints")(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)
    # a head-pruned GPT-2 needs our class: the export carries it, so transformers alone loads it
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dsee_gpt2" and config["architectures"] == ["DSEEGPT2LMHeadModel"]
    logits, model_class = logits_without_dsee_scale(out, ids, root / "g2-foreign")
    assert model_class == "DSEEGPT2LMHeadModel"
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_layerwise_calibration_equals_whole_model_forward(tuned, kind):
    from dsee_scale.pruning import unstructured as U
    from dsee_scale.pruning.run import CheckpointModel, layerwise_statistics

    cfg, ckpt, model_path = tuned[kind]
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    stats = layerwise_statistics(CheckpointModel(str(ckpt)), batches)
    model = rebuilt(ckpt, model_path)
    want = U.input_norms(model, U.prunable(model), batches)
    assert want
    for full, norm in want.items():
        _, _, i, rel = full.split(".", 3)
        torch.testing.assert_close(stats["blocks"][int(i)]["sq"][rel].sqrt(), norm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_checkpoint_blocks_are_read_in_their_saved_dtype(tuned, kind):
    """A block of a bf16 checkpoint is handed out in bf16 (half a float32 block's memory, the
    pruning stage's largest holding); merged, its weights equal a float32 block's merge exactly."""
    from dsee_scale.pruning.run import CheckpointModel

    cfg, ckpt, _ = tuned[kind]
    cm = CheckpointModel(str(ckpt))
    read = cm.ck.tensor

    def as_bf16(name):  # the tiny checkpoint saved float32: serve its frozen weights as bf16
        t = read(name)
        return t.bfloat16() if name in cm.ck.frozen_shapes and t.is_floating_point() else t

    cm.ck.tensor = as_bf16
    for i in range(cm.dims.layers):
        b = cm.block(i)
        frozen = {n: p.dtype for n, p in b.named_parameters() if not is_dsee_name(n)}
        assert set(frozen.values()) == {torch.bfloat16}, frozen
        targeted = [name for name, _ in dsee_layers(b)]
        assert targeted
        for merged in (False, True):
            got = cm.block(i, merged).state_dict()
            want = cm.block(i, merged, torch.float32).state_dict()  # the block read as float32
            assert got.keys() == want.keys()
            for name, t in got.items():
                assert torch.equal(t.float() if t.is_floating_point() else t, want[name]), (merged, name)
        for name in targeted:  # merged: the updates are in W (float32), which differs from the saved W
            w = got[f"{name}.weight"]
            assert w.dtype == torch.float32
            assert not torch.equal(w, b.get_submodule(name).base_layer.weight.float())


def test_wanda_and_activation_scores_through_the_launcher(tuned):
    from dsee_scale.pruning import unstructured as U

    cfg, ckpt, model_path = tuned["llama"]
    root = tuned["root"]
    out = root / "wanda"
    _, plan = prune(
        cfg,
        ckpt,
        out,
        2,
        "prune.kind=unstructured",
        "prune.score=wanda",
        "prune.ratio=0.3",
        "prune.calibration_batches=2",
        "train.max_steps=1",
    )
    # the same masks as the library computes on the whole tuned model with the same batches
    batches = calibration_batches(cfg, 2)
    model = rebuilt(ckpt, model_path)
    layers = U.prunable(model)
    keep = U.masks(U.scores(layers, "wanda", U.input_norms(model, layers, batches)), 0.3, "global")
    ck = ZeroCheckpoint(out / "checkpoints")
    for name, k in keep.items():
        w_name = (
            f"{name}.base_layer.weight"
            if f"{name}.base_layer.weight" in ck.frozen_shapes
            else f"{name}.weight"
        )
        w = ck.tensor(w_name).float()
        zero = w == 0
        assert torch.equal(zero, ~k), name

    _, plan_s = prune(
        cfg,
        ckpt,
        root / "act",
        1,
        "prune.heads_per_layer=1",
        "prune.head_score=activation",
        "prune.channels_per_layer=8",
        "prune.channel_score=activation",
        "train.max_steps=1",
    )
    assert len(plan_s["decision"]["layers"][0]["q_heads"]) == 2


def test_taylor_and_fisher_scores_through_the_launcher_match_mask_gradients(tuned):
    """prune.head_score=taylor / channel_score=fisher on two ranks (each pushes its share of the
    calibration batches through the ZeRO-3 tuned model, sums added): the plan equals the one made
    from an independent reference, the gradient of explicit head / channel masks (1s multiplied
    onto o_proj's and down_proj's inputs) per micro-batch: taylor = |sum_b g_b|, fisher = sum_b g_b^2."""
    from dsee_scale.pruning import make_plan

    cfg, ckpt, model_path = tuned["llama"]
    _, plan = prune(
        cfg,
        ckpt,
        tuned["root"] / "taylor",
        2,
        "prune.heads_per_layer=1",
        "prune.head_score=taylor",
        "prune.channels_per_layer=8",
        "prune.channel_score=fisher",
        "prune.calibration_batches=3",
        "train.max_steps=1",
        "prune.distill.kl_weight=1",  # the teacher is built after the partitioned scoring model
    )
    model = rebuilt(ckpt, model_path).eval()
    H, hd = model.config.num_attention_heads, model.config.head_dim
    exp = load_experiment(str(cfg))
    corpus = build_corpus(exp.data, ByteTokenizer())
    t = exp.train
    heads, channels = [], []
    for layer in model.model.layers:
        heads.append(torch.ones(H, requires_grad=True))
        channels.append(torch.ones(model.config.intermediate_size, requires_grad=True))
        m_h, m_c = heads[-1], channels[-1]
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, a, m=m_h: (a[0] * m.repeat_interleave(hd),)
        )
        layer.mlp.down_proj.register_forward_pre_hook(lambda mod, a, m=m_c: (a[0] * m,))
    masks = heads + channels
    per_batch = []
    for s in range(3):
        batch = micro_batch(corpus.train, s, 0, 0, 1, t.micro_batch_size, t.micro_batch_size, t.seed)
        per_batch.append(torch.autograd.grad(model(**batch).loss, masks))
    n = len(heads)
    taylor_h = torch.stack([sum(g[i] for g in per_batch).abs() for i in range(n)])
    fisher_c = torch.stack([sum(g[n + i] ** 2 for g in per_batch) for i in range(n)])
    assert (taylor_h.std(1) > 0).all() and (fisher_c.std(1) > 0).all()  # scores that rank something
    want = make_plan(model.config, taylor_h, 1, fisher_c, 8)
    assert plan["decision"] == want.to_dict()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sparsegpt_through_the_launcher_equals_a_whole_model_reference(tuned, kind):
    """prune.score=sparsegpt: the frozen weights the re-tune starts from (and keeps: they are
    frozen) equal SparseGPT applied block after block on the whole tuned model, block i's
    Hessian from a full forward with blocks < i already pruned; on two ranks too (each rank
    pushes its calibration batches, the Hessians are summed, the projections split)."""
    from dsee_scale.adapters.layer import unwrap, weight_out_in
    from dsee_scale.pruning import unstructured as U
    from dsee_scale.pruning.sparsegpt import sparsegpt_prune

    cfg, ckpt, model_path = tuned[kind]
    out = tuned["root"] / f"sparsegpt-{kind}"
    nproc = 2 if kind == "llama" else 1  # two ranks: Hessians summed over ranks, projections split
    args = ("prune.kind=unstructured", "prune.score=sparsegpt", "prune.ratio=0.5",
            "prune.calibration_batches=2", "train.max_steps=1")  # fmt: skip
    _, plan = prune(cfg, ckpt, out, nproc, *args)
    assert plan["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    batches = calibration_batches(cfg, 2)
    model = rebuilt(ckpt, model_path).eval()
    layers = U.prunable(model)
    blocks = sorted({n.split(".")[2] for n in layers}, key=int)  # model.layers.<i>. / transformer.h.<i>.
    want = {}
    with torch.no_grad():
        for i in blocks:
            mine = {n: m for n, m in layers.items() if n.split(".")[2] == i}
            hess: dict = {}

            def add(mod, a, n, hess=hess):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                hess[n] = hess.get(n, 0) + x.T @ x

            hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: add(mod, a, n)) for n, m in mine.items()]
            for ids in batches:
                model(input_ids=ids)
            for h in hooks:
                h.remove()
            for n, m in mine.items():
                w = weight_out_in(unwrap(m))
                new, _ = sparsegpt_prune(w, hess[n], 0.5)
                w.copy_(new.float())
                want[n] = new.float()
    ck = ZeroCheckpoint(out / "checkpoints")
    for n, w in want.items():
        name = f"{n}.base_layer.weight" if f"{n}.base_layer.weight" in ck.frozen_shapes else f"{n}.weight"
        got = ck.tensor(name).float()
        got = got.T if kind == "gpt2" else got  # GPT-2's Conv1D stores in x out
        assert torch.equal(got == 0, w == 0), n
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)


def test_head_count_the_kv_groups_cannot_take_is_a_clear_error(tuned):
    cfg, ckpt, _ = tuned["llama"]  # 4 q heads in 2 kv groups
    out = tuned["root"] / "bad-heads"
    r = launch(
        ROOT / "launchers" / "prune.py",
        1,
        "--from",
        str(ckpt),
        f"output_dir={out}",
        "prune.heads_per_layer=2",
        config_path=cfg,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "prune.heads_per_layer: cannot remove 2 of the 2 q heads of a kv group" in r.stderr
    assert not (out / "checkpoints").exists()


def test_recovery_on_every_linear_with_distillation_on_two_ranks(tuned):
    """prune.recovery puts fresh DSEE adapters on every linear of each block after merging the
    tuned update into W and pruning the merged W (50% per row); prune.distill adds the unpruned
    tuned model as a ZeRO-3 teacher. Checked against plain PyTorch: the frozen weights are the
    merged tuned weights with the per-row mask, step 1's loss is CE + T^2 KL(teacher || student)
    on the same batches, and the export keeps every zero (dsee.keep_zeros masks the update)."""
    import copy

    import torch.nn.functional as F

    from dsee_scale.adapters import merge_and_unload

    cfg, ckpt, model_path = tuned["llama"]
    out = tuned["root"] / "recovery"
    linears = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    prune(cfg, ckpt, out, 2, "prune.kind=unstructured", "prune.ratio=0.5", "prune.scope=row",
          "prune.score=magnitude", f"prune.recovery.target_modules={linears}", "prune.recovery.r=2",
          "prune.recovery.num_sparse=8", "prune.recovery.grebsmo_rounds=3", "prune.distill.kl_weight=50",
          "prune.distill.lm_weight=0.5", "prune.distill.temperature=2", "train.max_steps=2")  # fmt: skip
    ck = ZeroCheckpoint(out / "checkpoints")
    assert sum(len(info["slices"]) for info in ck.meta["dsee_layers"].values()) == 2 * 7  # 2 blocks

    teacher = rebuilt(ckpt, model_path)
    merged = copy.deepcopy(teacher)
    merge_and_unload(merged)
    student = rebuilt(out / "checkpoints")
    for name, w in merged.named_parameters():
        if ".layers." not in name or w.dim() != 2:
            continue
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep.scatter_(1, w.abs().topk(w.shape[1] // 2, dim=1).indices, True)
        frozen = student.get_parameter(name.replace(".weight", ".base_layer.weight"))
        torch.testing.assert_close(frozen, w * keep, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the student before its first update: B = 0, S = 0
        for n, p in student.named_parameters():
            if n.endswith(("lora_B", "sparse_values")):
                p.zero_()
    exp = load_experiment(str(cfg))
    corpus = build_corpus(exp.data, ByteTokenizer())
    t = exp.train
    parts, kls = [], []
    with torch.no_grad():
        for m in range(t.batch_size // t.micro_batch_size):
            batch = micro_batch(corpus.train, 0, m, 0, 1, t.micro_batch_size, t.batch_size, t.seed)
            s_out, t_logits = student(**batch), teacher(input_ids=batch["input_ids"]).logits
            p_t = F.softmax(t_logits[:, :-1] / 2, -1)
            log_s = F.log_softmax(s_out.logits[:, :-1] / 2, -1)
            kl = (p_t * (p_t.log() - log_s)).sum(-1).mean() * 4
            kls.append(kl.item())
            parts.append(0.5 * s_out.loss.item() + 50 * kl.item())
    # the KL term is well above the tolerance (a tiny random model's outputs are near uniform,
    # so its weight is large here): a loss without it could not pass
    assert 50 * min(kls) > 100 * 1e-5 * sum(parts) / len(parts)
    assert losses(out)[1] == pytest.approx(sum(parts) / len(parts), rel=1e-5, abs=1e-6)

    s = export_checkpoint(str(out / "checkpoints"), str(tuned["root"] / "recovery-export"))
    assert s["block_weight_zero_fraction"] == pytest.approx(0.5, abs=1e-3)  # every update kept W's zeros
    loaded = AutoModelForCausalLM.from_pretrained(tuned["root"] / "recovery-export").eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, rebuilt(out / "checkpoints")(ids).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("kind", ["structured", "recovery", "sparsegpt"])
def test_pruned_build_splits_blocks_over_ranks(tuned, kind):
    """Building the pruned model (issue #15): on 2 ranks block i is read and cut by rank i mod 2
    alone (twice with the tuned update kept: once for its supports, once for its weights), and
    the model every rank holds equals the 1-rank build, parameter by parameter and buffer by
    buffer (the sparse indices too). With SparseGPT a rank keeps the reconstructed weights of
    the blocks it fills only, not the whole model's."""
    cfg, ckpt, _ = tuned["gpt2" if kind == "structured" else "llama"]
    args = {
        "structured": ["prune.heads_per_layer=1", "prune.channels_per_layer=16"],
        "recovery": ["prune.kind=unstructured", "prune.ratio=0.5", "prune.scope=row", "prune.recovery.r=2",
                     "prune.recovery.num_sparse=8", "prune.recovery.target_modules=[q_proj,down_proj]"],
        "sparsegpt": ["prune.kind=unstructured", "prune.score=sparsegpt", "prune.ratio=0.5",
                      "prune.calibration_batches=2"],
    }[kind]  # fmt: skip
    reports = []
    for nproc in (1, 2):
        r = check(launch(ROOT / "tests" / "pruned_build_worker.py", nproc, "--from", str(ckpt), *args,
                         config_path=cfg))  # fmt: skip
        reports.append(json.loads(r.stdout.split("REPORT ", 1)[1].splitlines()[0]))
    one, two = reports
    assert (one["world"], two["world"]) == (1, 2)
    if kind != "sparsegpt":  # SparseGPT sums the ranks' Hessians: equal to rounding (its own test)
        assert one["digest"] == two["digest"]
    layers = 2
    times = 1 if kind == "recovery" else 2
    if kind == "sparsegpt":  # each rank keeps the reconstructed weights of the blocks it fills only
        assert one["held"] == [[0, 1]] and two["held"] == [[0], [1]], (one["held"], two["held"])
    assert sorted(one["built"][0]) == sorted(list(range(layers)) * times)
    for rank, built in enumerate(two["built"]):
        assert sorted(built) == sorted([i for i in range(layers) if i % 2 == rank] * times)
