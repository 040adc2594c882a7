"""The pruning stage behind `dsee-scale prune` / `deepspeed launchers/prune.py`: score, prune,
rebuild, re-tune.

1. The tuned ZeRO-3 checkpoint is read one decoder block at a time (no DeepSpeed): each block
   is rebuilt on CPU with its DSEE updates and scored. Scores that need activations (activation
   heads / channels, Wanda) push a few calibration batches through the blocks one after the
   other (layer-wise, as Wanda does). Each rank scores its share of the blocks and the scores or
   plans are exchanged, so all ranks take the same decision; a digest of it is compared across
   ranks to make sure.
2. The smaller model is built under ZeRO-3 (partitioned, nothing initialised, from the pruned
   config), DSEE is injected with the cut supports, and the kept slices are copied in block by
   block: block i read and cut by rank i mod world alone, each of its tensors gathered alone and
   broadcast from that rank. No rank holds the whole model, pruned or not.
3. Re-tuning is an ordinary training run (training/trainer.py) of A, B and S with the pruned W
   frozen; its checkpoints carry the pruned architecture in experiment.yaml, so
   `dsee-scale train --resume`, `dsee-scale prune --resume` and `dsee-scale export` work on them
   as on any run.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

import torch

from .. import zero
from ..adapters import (
    DSEEConfig,
    DSEELayer,
    choose_supports,
    dsee_layers,
    inject,
    merge_and_unload,
    supports_of,
)
from ..adapters.layer import delta_name
from ..archs import arch_of
from ..checkpoint import ZeroCheckpoint
from ..checkpoint import format as fmt
from ..config import from_dict
from ..errors import ConfigError, UserError
from ..experiment import ExperimentConfig, PruneConfig, load_experiment, parse_nm
from ..models import ModelConfig, load_config, load_tokenizer, resolve_preset
from ..zero import comm
from . import unstructured as U
from .scores import block_channel_scores, block_head_scores, make_plan
from .structured import Plan, plan_sizes, prune_block, pruned_config
from .taylor import GRADIENT_SCORES


class BlockStats(TypedDict):
    """Per projection of one block (names relative to it): sums over the calibration tokens of
    its input's squares (Wanda's norms) and absolute values (activation scores)."""

    sq: dict[str, torch.Tensor]
    abs: dict[str, torch.Tensor]


class CalibrationStats(TypedDict):
    tokens: int
    blocks: dict[int, BlockStats]


Masks = Mapping[int, dict[str, torch.Tensor]]  # block -> projection (relative name) -> keep-mask


def prune_and_retune(exp: ExperimentConfig, from_dir: str | None, resume: bool = False) -> dict:
    """The whole stage on every rank: decide and build the pruned model, then re-tune it (or
    continue a re-tuning run with resume). Returns the re-tuning run's summary."""
    from ..training.trainer import run, start_process_group

    if resume:  # the pruned model and its DSEE settings come from the run's own checkpoint
        from ..training.checkpoint import resume_point

        root, tag, _ = resume_point(exp)
        saved = load_experiment(str(root / tag / fmt.EXPERIMENT))
        resumed = replace(exp, model=saved.model, dsee=saved.dsee, prune=saved.prune)  # same distillation
        return run(resumed, resume=True, teacher=teacher_for(resumed, tuned_dir_of(exp)))
    if not from_dir:
        raise UserError("--from: give the tuning run's checkpoints directory (or --resume)")
    rank, _ = start_process_group(exp)
    pruned, build, summary = prepare(exp, from_dir, rank)
    if rank == 0:
        out = Path(pruned.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prune_plan.json").write_text(json.dumps(summary, indent=1))
        print(
            f"prune: {summary['kind']} from {summary['from']}, new sizes {summary['config']}, "
            f"decision {summary['decision_digest']} (plan in {out / 'prune_plan.json'})",
            flush=True,
        )
    return run(pruned, build=build, teacher=teacher_for(exp, from_dir))


def tuned_dir_of(exp: ExperimentConfig) -> str:
    """The tuned checkpoint a pruned run came from (its prune_plan.json says)."""
    plan = Path(exp.output_dir) / "prune_plan.json"
    try:
        return str(json.loads(plan.read_text())["from"])
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"--resume: {plan} is missing or unreadable; it names the tuned run to distill from"
        ) from None


def teacher_for(exp: ExperimentConfig, from_dir: str):
    """prune.distill: a builder of the unpruned tuned model (partitioned under ZeRO-3, frozen),
    the distillation teacher; None without distillation."""
    pc = exp.prune
    if pc is None or pc.distill.kl_weight == 0:
        return None

    cm = CheckpointModel(from_dir)

    def build(exp_, ds, rank, world):
        return tuned_model(exp_, cm, ds, rank)

    return build


def tuned_model(exp: ExperimentConfig, cm: CheckpointModel, ds: dict, rank: int) -> torch.nn.Module:
    """The tuned model of the checkpoint as it was (DSEE updates on), partitioned under ZeRO-3."""
    as_tuned = pruned_experiment(replace(exp, prune=None), cm, cm.config)
    unpruned = Decision(None, None, cm.config, {})
    model, _ = build_pruned(cm, PruneConfig(), unpruned, as_tuned, ds, rank, fresh=False)
    return model


class CheckpointModel:
    """The tuned model of a checkpoint, handed out one CPU block at a time."""

    def __init__(self, ckpt_dir: str):
        from transformers import AutoModelForCausalLM

        self.ck = ZeroCheckpoint(ckpt_dir)
        self.tuned = self.ck.experiment()
        self.model_cfg = from_dict(ModelConfig, self.tuned["model"], "model")
        self.dsee = from_dict(DSEEConfig, self.tuned["dsee"], "dsee")
        self.config = load_config(self.model_cfg)
        self.arch = arch_of(self.config)
        self.dims = self.arch.dims(self.config)
        with torch.device("meta"), zero.whole_loading():
            self.skeleton = AutoModelForCausalLM.from_config(self.config)
        self.layout = self.ck.meta["dsee_layers"]

    def block(self, i: int, merged: bool = False, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """Block i on CPU with its trained DSEE updates, weights from the checkpoint: each tensor
        in the dtype it was saved in (a bf16 block is half the memory of a float32 one), or all in
        `dtype` (float32 for the calibration walks). merged: the updates folded into W in float32
        (those weights are float32 then), plain layers."""
        b = copy.deepcopy(self.arch.block_list(self.skeleton)[i]).to_empty(device="cpu")  # untouched pages
        pre = self.arch.block_prefix(i)
        for name, info in self.layout.items():
            if not name.startswith(pre):
                continue
            rel = name[len(pre) :]
            deltas = {s: self.ck.dsee_delta(delta_name(name, s), self.dsee) for s in info["slices"]}
            b.set_submodule(rel, DSEELayer(b.get_submodule(rel), deltas, self.dsee.keep_zeros))
        state = {k: self.ck.tensor(pre + k) for k in b.state_dict()}  # each read once, kept as read
        b.load_state_dict(state, strict=True, assign=True)
        if dtype is not None:
            b.to(dtype)
        if merged:
            for _, layer in dsee_layers(b):
                layer.base_layer.float()  # W + update in float32, as a float32 block would
            merge_and_unload(b)
        return b


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class BlockWalk:
    """Calibration batches pushed through the tuned model one block at a time: `inputs` are
    block i's inputs; `advance(b)` runs them through block b (rebuilt from the checkpoint by the
    caller), so no rank ever holds the whole model."""

    def __init__(self, cm: CheckpointModel, batches: list[torch.Tensor]):
        arch, ck = cm.arch, cm.ck
        token = ck.tensor(arch.embeddings[0]).float()
        self.inputs = [token[ids] for ids in batches]
        if len(arch.embeddings) > 1:  # learned position embeddings (GPT-2)
            position = ck.tensor(arch.embeddings[1]).float()
            self.inputs = [h + position[torch.arange(h.shape[1])] for h in self.inputs]
        self.rotary = None
        if arch.rotary_emb is not None:
            self.rotary = type(cm.skeleton.get_submodule(arch.rotary_emb))(config=cm.config)

    def run(self, b: torch.nn.Module) -> list[torch.Tensor]:
        out = []
        for h in self.inputs:
            if self.rotary is None:
                o = b(h)
            else:
                pos = torch.arange(h.shape[1])[None]
                o = b(h, position_ids=pos, position_embeddings=self.rotary(h, pos))
            out.append(o[0] if isinstance(o, tuple) else o)
        return out

    def advance(self, b: torch.nn.Module) -> None:
        self.inputs = self.run(b)


def input_hooks(layers: dict[str, torch.nn.Module], fn) -> list:
    """fn(name, x as (tokens, in) float32) on every forward of each layer; returns the handles."""
    return [
        layer.register_forward_pre_hook(
            lambda module, args, name=name: fn(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))
        )
        for name, layer in layers.items()
    ]


@torch.no_grad()
def layerwise_statistics(cm: CheckpointModel, batches: list[torch.Tensor]) -> CalibrationStats:
    """Per block and projection: sum of x^2 and of |x| over the calibration tokens of its input
    (Wanda norms, activation scores), layer-wise through the tuned blocks (BlockWalk)."""
    walk = BlockWalk(cm, [batches[j] for j in comm.my_share(len(batches))])  # each rank: its batches
    stats: CalibrationStats = {"tokens": sum(ids.numel() for ids in batches), "blocks": {}}
    for i in range(cm.dims.layers):
        b = cm.block(i, dtype=torch.float32).eval()
        layers = U.prunable(b, ["*"])
        sq: dict = {n: 0 for n in layers}
        ab: dict = {n: 0 for n in layers}

        def add(name, x, sq=sq, ab=ab):
            sq[name] = sq[name] + x.pow(2).sum(0)
            ab[name] = ab[name] + x.abs().sum(0)

        handles = input_hooks(layers, add)
        walk.advance(b)
        for handle in handles:
            handle.remove()
        stats["blocks"][i] = {"sq": summed_over_ranks(sq, layers), "abs": summed_over_ranks(ab, layers)}
    return stats


def summed_over_ranks(part: dict, layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Per-layer input sums of this rank's calibration batches, added over the ranks (a rank
    without batches contributes zeros)."""
    from ..adapters.layer import layer_dims, unwrap

    out = {}
    for name, layer in layers.items():
        v = part[name]
        t = v if torch.is_tensor(v) else torch.zeros(layer_dims(unwrap(layer))[0])
        out[name] = comm.sum_over_ranks(t.double()).float()
    return out


@torch.no_grad()
def sparsegpt_blocks(
    cm: CheckpointModel, pc: PruneConfig, batches: list[torch.Tensor]
) -> tuple[Masks, dict[int, dict[str, torch.Tensor]]]:
    """SparseGPT on every targeted projection, block after block: block i's Hessians come from
    the outputs of the already-pruned blocks before it (the DSEE updates stay on). Returns the
    keep-masks and the reconstructed frozen weights (out x in) of the blocks this rank fills
    (block i: rank i mod world), not of every block (that would be the whole model per rank)."""
    from ..adapters.layer import layer_dims, unwrap, weight_out_in
    from .sparsegpt import sparsegpt_prune

    nm = parse_nm(pc.nm) if pc.nm is not None else None
    walk = BlockWalk(cm, [batches[j] for j in comm.my_share(len(batches))])  # each rank: its batches
    keep: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(cm.dims.layers):
        b = cm.block(i, pc.recovery is not None, torch.float32).eval()  # recovery: prune the merged W
        layers = U.prunable(b, pc.targets or ["*"])
        names = list(layers)
        hess: dict[str, torch.Tensor] = {n: 0 for n in names}  # type: ignore[misc]

        def add(name, x, hess=hess):
            hess[name] = hess[name] + x.double().T @ x.double()

        handles = input_hooks(layers, add)
        walk.run(b)
        for handle in handles:
            handle.remove()
        mine = {}
        for j in range(len(names)):  # every rank adds its Hessians; each prunes its projections
            name = names[j]
            cols = layer_dims(unwrap(layers[name]))[0]
            h = hess[name] if torch.is_tensor(hess[name]) else torch.zeros(cols, cols, dtype=torch.float64)
            h = comm.sum_over_ranks(h)
            if j in comm.my_share(len(names)):
                try:
                    mine[name] = sparsegpt_prune(weight_out_in(unwrap(layers[name])), h, pc.ratio, nm)
                except ValueError as e:
                    raise ConfigError(f"prune.nm: {cm.arch.block_prefix(i)}{name}: {e}") from None
        writer = i in comm.my_share(cm.dims.layers)  # the rank that fills block i keeps its result
        if writer:
            keep[i], weights[i] = {}, {}
        for name, (new, k) in comm.merged_over_ranks(mine).items():
            w = weight_out_in(unwrap(layers[name]))
            w.copy_(new.to(w.dtype))
            if writer:
                keep[i][name], weights[i][name] = k, w.detach().clone()
        walk.advance(b)  # the pruned block's outputs feed the next block
    return keep, weights


def calibration(exp: ExperimentConfig, cm: CheckpointModel, pc: PruneConfig) -> CalibrationStats | None:
    """Layer-wise statistics when a score needs them (activation, wanda), else None."""
    needs = (pc.kind == "structured" and "activation" in (pc.head_score, pc.channel_score)) or (
        pc.kind == "unstructured" and pc.score == "wanda"
    )
    if not needs:
        return None
    return layerwise_statistics(cm, calibration_batches(exp, cm, pc))


def calibration_batches(exp: ExperimentConfig, cm: CheckpointModel, pc: PruneConfig) -> list[torch.Tensor]:
    """The input ids of `prune.calibration_batches` micro-batches of the training data."""
    return [b["input_ids"] for b in calibration_micro_batches(exp, cm, pc)]


def calibration_micro_batches(
    exp: ExperimentConfig, cm: CheckpointModel, pc: PruneConfig
) -> list[dict[str, torch.Tensor]]:
    """`prune.calibration_batches` micro-batches of the training data, as the run would see them."""
    from ..data import ByteTokenizer, build_corpus, micro_batch

    if exp.data is None:
        raise ConfigError(f"data: {pc.kind} pruning with these scores needs calibration batches from "
                          "the experiment's data section")  # fmt: skip
    tok = load_tokenizer(cm.model_cfg) or ByteTokenizer()
    corpus = build_corpus(exp.data, tok)
    t = exp.train
    return [
        micro_batch(corpus.train, s, 0, 0, 1, t.micro_batch_size, t.micro_batch_size, t.seed)
        for s in range(pc.calibration_batches)
    ]


def _activation(stats: CalibrationStats | None, i: int, name: str) -> torch.Tensor:
    if stats is None:
        raise ValueError("activation scores need calibration statistics")
    return stats["blocks"][i]["abs"][name] / stats["tokens"]


def gradient_group_scores(exp: ExperimentConfig, cm: CheckpointModel, pc: PruneConfig) -> dict:
    """Taylor and Fisher scores of every head and MLP channel (pruning/taylor.py): the tuned
    model is built partitioned under ZeRO-3 for it (forward-only engine) and released after."""
    from ..data import to_device
    from ..training.distill import teacher_engine
    from ..training.engine import deepspeed_config
    from .taylor import mask_gradient_scores

    rank, world = comm.rank_and_world()
    ds = deepspeed_config(exp, world, getattr(cm.config, "hidden_size", None))
    engine = teacher_engine(tuned_model(exp, cm, ds, rank), ds)
    dims, arch = cm.dims, cm.arch
    groups = {}
    for i in range(dims.layers):
        groups[arch.block_prefix(i) + arch.o] = (dims.heads, dims.head_dim)
        groups[arch.block_prefix(i) + arch.mlp_out] = (dims.intermediate, 1)
    batches = calibration_micro_batches(exp, cm, pc)
    try:
        # through the module itself (its ZeRO-3 hooks gather): a forward-only engine's own
        # forward registers backward hooks that refuse a backward outside engine.backward
        return mask_gradient_scores(
            engine.module,
            groups,
            batches,
            lambda b: engine.module(**to_device(b, engine.device), use_cache=False).loss,
        )
    finally:
        engine.destroy()


def structured_plan(
    cm: CheckpointModel, pc: PruneConfig, stats: CalibrationStats | None = None, grad: dict | None = None
) -> Plan:
    """Head and channel scores, each rank scoring its share of the blocks (exchanged), then the
    plan every rank derives alike from all of them. `grad`: gradient_group_scores (taylor, fisher)."""
    arch, dims = cm.arch, cm.dims

    def block_scores(i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b = cm.block(i)
        h = c = None
        pre = arch.block_prefix(i)
        if pc.heads_per_layer:
            if pc.head_score == "activation":
                h = _activation(stats, i, arch.o).view(dims.heads, dims.head_dim).sum(1)
            elif pc.head_score in GRADIENT_SCORES:
                assert grad is not None
                h = grad[pc.head_score][pre + arch.o]
            else:
                h = block_head_scores(b, cm.config, pc.head_score)
        if pc.channels_per_layer:
            if pc.channel_score == "activation":
                c = _activation(stats, i, arch.mlp_out)
            elif pc.channel_score in GRADIENT_SCORES:
                assert grad is not None
                c = grad[pc.channel_score][pre + arch.mlp_out]
            else:
                c = block_channel_scores(b, cm.config)
        return h, c

    per_block = comm.merged_over_ranks({i: block_scores(i) for i in comm.my_share(dims.layers)})
    hs = [per_block[i][0] for i in range(dims.layers) if per_block[i][0] is not None]
    cs = [per_block[i][1] for i in range(dims.layers) if per_block[i][1] is not None]
    return make_plan(
        cm.config,
        torch.stack(hs) if hs else None,
        pc.heads_per_layer,
        torch.stack(cs) if cs else None,
        pc.channels_per_layer,
        pc.gqa,
    )


def unstructured_masks(cm: CheckpointModel, pc: PruneConfig, stats: CalibrationStats | None = None) -> Masks:
    """Keep-masks per block (names relative to the block). Each rank scores its share of the
    blocks, one block at a time; a global threshold is found from streamed histograms summed
    over the ranks (never all scores at once). The masks themselves are never exchanged: any
    rank computes any block's masks from the shared rule when it asks for them (BlockMasks)."""

    from ..training.monitor import progress_bar

    merged = pc.recovery is not None and pc.score in ("magnitude", "wanda")  # scores of the merged W
    mine = comm.my_share(cm.dims.layers)  # each rank scores its share of the blocks for the threshold
    streamed = pc.nm is None and pc.scope == "global"  # else decided inside each matrix
    shown = streamed and comm.rank_and_world()[0] == 0
    bar = progress_bar(f"{pc.score} scores, 3 passes", shown, unit="block")
    scored = 0

    def score_of_block(i: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Block i's scores one matrix at a time (the block is read now, in its saved dtype)."""
        nonlocal scored
        norms = None if stats is None else {k: v.sqrt() for k, v in stats["blocks"][i]["sq"].items()}
        out = U.each_score(U.prunable(cm.block(i, merged), pc.targets or ["*"]), pc.score, norms)
        scored += 1
        if bar is not None and scored <= 3 * len(mine):
            bar(scored, 3 * len(mine))
        return out

    if not streamed:  # any rank computes any block's masks on its own, one matrix at a time
        nm = parse_nm(pc.nm) if pc.nm is not None else None
        return U.BlockMasks(
            cm.dims.layers,
            lambda i: {k: U.masks({k: s}, pc.ratio, pc.scope, nm)[k] for k, s in score_of_block(i)},
        )
    return U.streamed_global_masks(score_of_block, cm.dims.layers, pc.ratio, mine, comm.all_gather_objects)


@dataclass
class Decision:
    """What pruning removes: a structured plan or unstructured keep-masks (with SparseGPT's
    reconstructed frozen weights), and the new config."""

    plan: Plan | None
    keep: Masks | None
    config: Any
    summary: dict  # JSON-able: plan or mask digests, weight sparsity
    weights: dict[int, dict[str, torch.Tensor]] | None = None  # block -> projection -> W (out x in)


@torch.no_grad()
def pruned_block(
    cm: CheckpointModel, i: int, pc: PruneConfig, decision: Decision, merged: bool = False
) -> torch.nn.Module:
    """Block i with the decision applied: its DSEE layers cut alike, or (merged) plain layers
    holding W + update, pruned."""
    from ..adapters.layer import unwrap, weight_out_in

    keep = decision.keep[i] if decision.keep is not None else None  # scored (and let go) first
    b = cm.block(i, merged)
    if decision.plan is not None:
        prune_block(b, cm.arch, decision.plan.layers[i], cm.dims)
    if keep is not None:
        layers = U.prunable(b, pc.targets or ["*"])
        for name, w in (decision.weights or {}).get(i, {}).items():
            weight_out_in(unwrap(layers[name])).copy_(w)
        U.apply_masks(layers, keep)
    return b


def decide(exp: ExperimentConfig, cm: CheckpointModel, pc: PruneConfig) -> Decision:
    stats = calibration(exp, cm, pc)
    if pc.kind == "unstructured":
        weights = None
        if pc.score == "sparsegpt":
            keep, weights = sparsegpt_blocks(cm, pc, calibration_batches(exp, cm, pc))
        else:
            keep = unstructured_masks(cm, pc, stats)

        def facts(i: int) -> tuple[dict[str, str], int, int]:  # digests, pruned, entries
            d = keep[i]
            return ({k: hashlib.sha256(m.numpy().tobytes()).hexdigest() for k, m in d.items()},
                    sum(int((~m).sum()) for m in d.values()), sum(m.numel() for m in d.values()))  # fmt: skip

        per_block = comm.merged_over_ranks({i: facts(i) for i in comm.my_share(cm.dims.layers)})
        digests = {i: per_block[i][0] for i in sorted(per_block)}
        sparsity = sum(f[1] for f in per_block.values()) / sum(f[2] for f in per_block.values())
        return Decision(None, keep, cm.config, {"decision": digests, "weight_sparsity": sparsity}, weights)
    H, KV, hd, inter, _, _ = cm.dims
    if pc.channels_per_layer >= inter:
        raise ConfigError(f"prune.channels_per_layer: {pc.channels_per_layer} of {inter} channels; "
                          f"allowed: 0..{inter - 1}")  # fmt: skip
    wants_gradient = (pc.heads_per_layer and pc.head_score in GRADIENT_SCORES) or (
        pc.channels_per_layer and pc.channel_score in GRADIENT_SCORES
    )
    grad = gradient_group_scores(exp, cm, pc) if wants_gradient else None
    try:
        plan = structured_plan(cm, pc, stats, grad)
    except ValueError as e:  # a head count the kv groups cannot take
        raise ConfigError(f"prune.heads_per_layer: {e} (model: {H} q heads, {KV} kv heads)") from None
    nq, nkv, nch = plan_sizes(plan, inter)
    config = pruned_config(cm.config, nq, nkv, hd, nch)
    return Decision(plan, None, config, {"decision": plan.to_dict(), "weight_sparsity": None})


def pruned_experiment(exp: ExperimentConfig, cm: CheckpointModel, config: Any) -> ExperimentConfig:
    """The re-tuning experiment: the pruned model (as a config; weights come from the builder)
    with the tuned run's tokenizer and DSEE settings, the rest from `exp`."""
    src = resolve_preset(cm.model_cfg)
    has_tokenizer = load_tokenizer(src) is not None  # random / bare models: byte tokens
    tokenizer = (src.tokenizer or src.path or src.gguf_file) if has_tokenizer else None
    cfg_dict = config.to_dict()
    for key in ("transformers_version", "architectures", "dtype"):
        cfg_dict.pop(key, None)
    model = ModelConfig(config=cfg_dict, tokenizer=tokenizer, dtype=cm.model_cfg.dtype)
    pc = exp.prune
    if pc is None:  # the teacher: the tuned model as it was
        return replace(exp, model=model, dsee=copy.deepcopy(cm.dsee))
    dsee = copy.deepcopy(pc.recovery or cm.dsee)
    dsee.keep_zeros = pc.kind == "unstructured" and pc.keep_zeros
    return replace(exp, model=model, dsee=dsee)


def prepare(exp: ExperimentConfig, from_dir: str, rank: int):
    """Score and decide (the same on every rank, checked); returns (the pruned experiment to
    re-tune, a builder for trainer.run, a summary for prune_plan.json)."""
    from ..training.monitor import mark_stage, release_freed_memory

    pc = exp.prune
    if pc is None:
        raise ConfigError("prune: the experiment has no prune section")
    cm = CheckpointModel(from_dir)
    decision = decide(exp, cm, pc)
    mark_stage("scores")  # the blocks read and scored, the plan or threshold decided
    release_freed_memory()  # the blocks read and scored
    d = digest(decision.summary["decision"])
    if len(set(comm.all_gather_objects(d))) != 1:
        raise RuntimeError("ranks took different pruning decisions")
    pruned = pruned_experiment(exp, cm, decision.config)

    def build(exp_, ds, rank_, world_):
        return build_pruned(cm, pc, decision, exp_, ds, rank_, fresh=pc.recovery is not None)

    sizes = pruned.model.config or {}
    keys = (cm.arch.heads_key, cm.arch.kv_heads_key, cm.arch.intermediate_key, "head_dim")
    summary = {"from": str(cm.ck.dir), "kind": pc.kind, "decision_digest": d, **decision.summary,
               "config": {k: sizes[k] for k in keys if k and k in sizes}}  # fmt: skip
    return pruned, build, summary


def _cut_block_state(cm: CheckpointModel, i: int, pc: PruneConfig, decision: Decision, merged: bool) -> dict:
    return pruned_block(cm, i, pc, decision, merged).state_dict()


def _entry(state: Callable[[], dict], name: str) -> torch.Tensor:
    return state()[name]


def build_pruned(
    cm: CheckpointModel,
    pc: PruneConfig,
    decision: Decision,
    exp: ExperimentConfig,
    ds: dict,
    rank: int,
    fresh: bool,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The pruned DSEE model, partitioned under ZeRO-3, with the kept weights copied in: the
    tuned updates cut alike, or (fresh, prune.recovery) W + update merged and pruned, with new
    adapters of exp.dsee whose supports are chosen from the pruned weights.

    The work is split over ranks: block i is read, cut and written by rank i mod W alone (the
    others receive its tensors in copy_full_into's broadcast), and the model is built with
    nothing initialised, since every parameter is written here."""
    from ..adapters.inject import resolve_targets
    from ..training.engine import blank_model
    from ..training.monitor import progress_bar, release_freed_memory
    from ..zero import copy_full_into

    world = comm.rank_and_world()[1]
    model = blank_model(exp, ds)
    supports: dict[str, torch.Tensor] = {}
    if not fresh:
        cut_only = replace(decision, keep=None, weights=None)  # masks leave the supports alone
        mine = {}
        for i in comm.my_share(cm.dims.layers):  # supports first: inject needs all of them
            b = pruned_block(cm, i, pc, cut_only)
            mine.update({cm.arch.block_prefix(i) + k: v for k, v in supports_of(b).items()})
            del b
        supports = comm.merged_over_ranks(mine)
        inject(model, exp.dsee, supports)
    bar = progress_bar("pruned blocks into the model", rank == 0, unit="block")
    for i in range(cm.dims.layers):
        prefix = cm.arch.block_prefix(i)
        # read and cut once, on the first tensor this rank writes (only rank i mod world does)
        cut = functools.cache(functools.partial(_cut_block_state, cm, i, pc, decision, fresh))
        for rel in model.get_submodule(prefix.rstrip(".")).state_dict():  # every rank's order
            copy_full_into(model, prefix + rel, functools.partial(_entry, cut, rel), rank, writer=i % world)
        cut.cache_clear()
        if bar is not None:
            bar(i + 1, cm.dims.layers)
    outside = [n for n, _ in model.named_parameters() if cm.arch.block_index(n) is None]
    for j, name in enumerate(outside):  # embeddings, final norm, (untied) lm_head
        copy_full_into(model, name, functools.partial(cm.ck.tensor, name), rank, writer=j % world)
    if fresh:  # new adapters on the pruned weights, supports spread over ranks
        bar = progress_bar(f"recovery supports ({exp.dsee.support})", rank == 0)
        supports = choose_supports(model, resolve_targets(model, exp.dsee), exp.dsee, bar)
        inject(model, exp.dsee, supports)
    release_freed_memory()  # the blocks read and cut, before the engine allocates
    return model, supports
