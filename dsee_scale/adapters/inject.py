"""Putting DSEE updates into a model, taking them out, saving and loading them.

    targets = resolve_targets(model, cfg)     # which matrices / fused slices
    inject(model, cfg)                        # supports chosen from W, A/B/S added, rest frozen
    merge(model) / unmerge(model)             # fold (alpha/r)(BA + S) into W and back
    save_adapter(model, dir) / load_adapter(base_model, dir)

`inject` takes precomputed `supports`: under ZeRO-3, `choose_supports` picks them on gathered
weights with the work spread over ranks, and gives every rank the same ones.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import zero
from ..archs import BY_MODEL_TYPE, FULL, arch_of
from ..config import from_dict
from ..errors import ConfigError, UserError
from ..zero import comm
from .config import DSEEConfig
from .delta import SparseLowRankDelta
from .layer import (
    BASE,
    MARKER,
    DSEELayer,
    is_dsee_name,
    layer_dims,
    slice_bounds,
    unwrap,
    weight_of,
    weight_out_in,
)
from .support import select_supports

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "dsee_config.json"
SUPPORTED_LAYERS = (nn.Linear, Conv1D)
DSEE_CONFIG_ATTR = "dsee_config"  # an injected model carries its DSEEConfig here


@dataclass(frozen=True)
class Target:
    module: str  # dotted module name, e.g. "transformer.h.0.attn.c_attn"
    slice: str = FULL  # "full", or "q" / "k" / "v" of a fused qkv projection

    @property
    def key(self) -> str:
        return self.module if self.slice == FULL else f"{self.module}:{self.slice}"

    def seed(self, base_seed: int) -> int:
        """A per-matrix seed: the same on every rank, whatever order matrices are visited in."""
        return zlib.crc32(f"{base_seed}/{self.key}".encode()) & 0x7FFFFFFF


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def resolve_targets(model: nn.Module, cfg: DSEEConfig) -> list[Target]:
    """The (module, slice) pairs that `cfg.target_modules` names, validated."""
    patterns = cfg.target_modules
    if not patterns:
        try:
            patterns = list(arch_of(model).default_targets)
        except ValueError:
            raise ConfigError(
                f"dsee.target_modules: required for model type {_model_type(model)!r} "
                f"(defaults exist for: {', '.join(BY_MODEL_TYPE)})"
            ) from None
    modules = dict(model.named_modules())
    found: dict[str, set[str]] = {}
    for pat in patterns:
        name_pat, _, slice_name = pat.partition(":")
        hits = [
            n
            for n, m in modules.items()
            if n
            and (fnmatch.fnmatchcase(n, name_pat) or fnmatch.fnmatchcase(n, "*." + name_pat))
            and not isinstance(m, DSEELayer)
            and not is_dsee_name(n)
            and not n.endswith("." + BASE)
        ]
        if not hits:
            sample = ", ".join(n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS))
            raise ConfigError(
                f"dsee.target_modules: pattern {pat!r} matches no module of this "
                f"{_model_type(model)} model; Linear/Conv1D modules are: {sample[:300]}"
            )
        for n in hits:
            m = modules[n]
            if not isinstance(m, SUPPORTED_LAYERS):
                raise ConfigError(
                    f"dsee.target_modules: {pat!r} matches {n!r}, a {type(m).__name__}; "
                    "DSEE targets torch.nn.Linear and transformers Conv1D layers"
                )
            if slice_name and layer_dims(m)[1] % 3:
                raise ConfigError(
                    f"dsee.target_modules: {pat!r} asks for a q/k/v slice of {n!r}, whose "
                    f"{layer_dims(m)[1]} outputs are not a fused q/k/v of three equal parts"
                )
            found.setdefault(n, set()).add(slice_name or FULL)
    targets = []
    for n, slices in found.items():
        if FULL in slices and len(slices) > 1:
            raise ConfigError(f"dsee.target_modules: {n!r} is targeted both whole and by slice")
        targets += [Target(n, s) for s in sorted(slices)]
    return targets


def base_layer(model: nn.Module, t: Target) -> nn.Module:
    """The Linear / Conv1D of a target, injected or not."""
    return unwrap(model.get_submodule(t.module))


def target_weight(model: nn.Module, t: Target) -> torch.Tensor:
    """The out x in weight of one target (a slice of the fused matrix for q/k/v)."""
    layer = base_layer(model, t)
    lo, hi = slice_bounds(layer, t.slice)
    return weight_out_in(layer)[lo:hi]


def target_shape(model: nn.Module, t: Target) -> tuple[int, int]:
    """(rows, cols) = (out, in) of one target's weight (slice)."""
    layer = base_layer(model, t)
    lo, hi = slice_bounds(layer, t.slice)
    return hi - lo, layer_dims(layer)[0]


def check_num_sparse(model: nn.Module, targets: list[Target], cfg: DSEEConfig) -> None:
    for t in targets:
        rows, cols = target_shape(model, t)
        if cfg.n_for(rows, cols) > rows * cols:
            raise ConfigError(
                f"dsee.num_sparse: {cfg.num_sparse} is larger than {t.key} "
                f"({rows} x {cols} = {rows * cols} entries); allowed: 0..{rows * cols}"
            )


def compute_supports(
    weights: dict[str, torch.Tensor],
    targets: list[Target],
    cfg: DSEEConfig,
    short: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Omega for each target from its (full, gathered) weight, keyed by Target.key. GreBsmo
    matrices whose S has fewer than N non-zeros (Omega completed by magnitude, support.py) go
    into `short`, or are warned about here when no `short` is given."""
    mine: dict[str, int] = {} if short is None else short
    out = select_supports(
        weights,
        {k: cfg.n_for(*w.shape) for k, w in weights.items()},
        cfg.support,
        {t.key: t.seed(cfg.seed) for t in targets},
        grebsmo_rounds=cfg.grebsmo_rounds,
        grebsmo_threshold=cfg.grebsmo_relative_threshold,
        grebsmo_rank_fraction=cfg.grebsmo_rank_fraction,
        svd_rank=cfg.svd_rank,
        short=mine,
    )
    if short is None:
        warn_short(mine, cfg)
    return out


def warn_short(short: dict[str, int], cfg: DSEEConfig) -> None:
    """One warning for all matrices whose GreBsmo S kept fewer than N non-zeros."""
    if not short:
        return
    examples = ", ".join(f"{k} ({v})" for k, v in list(short.items())[:3])
    warnings.warn(
        f"GreBsmo: {len(short)} matrices kept fewer than N non-zeros in S at "
        f"dsee.grebsmo_relative_threshold={cfg.grebsmo_relative_threshold} (e.g. {examples}); their "
        "other positions are the largest |W| outside S (a lower threshold lets S choose them)",
        stacklevel=3,
    )


def choose_supports(
    model: nn.Module,
    targets: list[Target],
    cfg: DSEEConfig,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Omega of every target, the selection work spread over ranks; all ranks get all supports.

    Under ZeRO-3 each rank is handed one gathered weight per wave (zero.full_tensors_one_per_rank),
    selects its support while the others select theirs, and the wave's supports are exchanged.
    On one process this is compute_supports on every weight, one at a time."""
    items = [(t, weight_of(base_layer(model, t)), lambda t=t: target_weight(model, t)) for t in targets]
    supports: dict[str, torch.Tensor] = {}
    short: dict[str, int] = {}
    for done, mine in zero.full_tensors_one_per_rank(items):
        local = {}
        if mine is not None:
            t, w = mine
            local = {k: v.cpu() for k, v in compute_supports({t.key: w}, [t], cfg, short).items()}
            del w
        for part in comm.all_gather_objects(local):
            supports.update(part)
        if progress is not None:
            progress(done, len(targets))
    warn_short(short, cfg)  # this rank's matrices
    return supports


def build_delta(
    model: nn.Module, t: Target, cfg: DSEEConfig, index: torch.Tensor, dtype: torch.dtype | None = None
) -> SparseLowRankDelta:
    rows, cols = target_shape(model, t)
    # N may be smaller than num_sparse after structured pruning cut rows / columns of S (with
    # sparse_density, the kept positions may round above the density of the smaller matrix)
    most = cfg.num_sparse if cfg.sparse_density is None else rows * cols
    if (
        index.dim() != 2
        or index.shape[0] != 2
        or index.shape[1] > most
        or (
            index.numel()
            and (int(index[0].max()) >= rows or int(index[1].max()) >= cols or int(index.min()) < 0)
        )
    ):
        raise UserError(f"support for {t.key} does not fit a {rows} x {cols} matrix with num_sparse={most}")
    delta = SparseLowRankDelta(cols, rows, cfg.r, cfg.alpha, index, cfg.dropout)
    delta.reset_parameters(torch.Generator().manual_seed(t.seed(cfg.seed) + 1), cfg.init_a)
    return delta.to(dtype) if dtype is not None else delta


def inject(
    model: nn.Module, cfg: DSEEConfig, supports: dict[str, torch.Tensor] | None = None
) -> list[Target]:
    """Freeze the model and wrap each targeted layer in a DSEELayer. Returns the targets."""
    targets = resolve_targets(model, cfg)
    check_num_sparse(model, targets, cfg)
    if supports is None and cfg.support == "gradient":
        raise UserError(
            "dsee.support gradient needs calibration batches: train with the launcher (it "
            "chooses it from data), or compute it with adapters.gradient and pass the supports"
        )
    if supports is None:
        weights = {t.key: target_weight(model, t).detach() for t in targets}
        supports = compute_supports(weights, targets, cfg)
    missing = [t.key for t in targets if t.key not in supports]
    if missing:
        raise UserError(f"no support given for {', '.join(missing[:5])}")
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for t in targets:
        by_module.setdefault(t.module, []).append(t)
    for name, ts in by_module.items():
        base = model.get_submodule(name)
        w = weight_of(base)
        deltas = {
            t.slice: build_delta(model, t, cfg, supports[t.key]).to(zero.placement(w), w.dtype) for t in ts
        }
        parent_name, _, child = name.rpartition(".")
        layer = DSEELayer(base, deltas, cfg.keep_zeros)
        if cfg.keep_zeros:  # the layer's own forward reads W (its mask)
            zero.use_in_forward(layer, w)
        setattr(model.get_submodule(parent_name), child, layer)
    setattr(model, DSEE_CONFIG_ATTR, cfg)  # noqa: B010 (what save_adapter writes)
    return targets


def dsee_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, DSEELayer):
            yield name, m


def merge(model: nn.Module) -> None:
    for _, layer in dsee_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in dsee_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> None:
    """Fold every update into its weight and put the plain Linear / Conv1D back (no DSEE left)."""
    for name, layer in list(dsee_layers(model)):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)


def supports_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in dsee_layers(model):
        for s, delta in layer.updates():
            out[Target(name, s).key] = delta.sparse_index
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, B, S values and S indices of every DSEE update (nothing of the base model)."""
    return {k: v for k, v in model.state_dict().items() if is_dsee_name(k)}


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable_count(model: nn.Module, targets: list[Target], cfg: DSEEConfig) -> int:
    """sum over targets of r * (in + out) + N."""
    total = 0
    for t in targets:
        rows, cols = target_shape(model, t)
        total += cfg.r * (rows + cols) + cfg.n_for(rows, cols)
    return total


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write adapter_model.safetensors (A, B, S values + indices) and dsee_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "dsee_scale": "adapter"})
    meta = {
        "dsee": asdict(getattr(model, DSEE_CONFIG_ATTR)),
        "model_type": _model_type(model),
        "targets": sorted(supports_of(model)),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[Target]:
    """Inject the saved DSEE updates into a fresh base model and load their values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (d / f).is_file():
            raise UserError(f"adapter directory {str(d)!r} has no {f}")
    try:
        meta = json.loads((d / ADAPTER_CONFIG).read_text())
        cfg = from_dict(DSEEConfig, meta["dsee"], "dsee")
        state = load_file(str(d / ADAPTER_WEIGHTS))
    except (json.JSONDecodeError, KeyError, SafetensorError, OSError) as e:
        raise UserError(f"adapter in {str(d)!r} cannot be read: {e}") from None
    supports = {}
    for k, v in state.items():
        if k.endswith(".sparse_index"):
            module, _, s = k[: -len(".sparse_index")].rpartition(MARKER)
            supports[Target(module, s).key] = v
    cfg.target_modules = [_exact_pattern(k) for k in supports]
    targets = inject(model, cfg, supports)
    missing, unexpected = _load_into(model, state)
    if missing or unexpected:
        raise UserError(
            f"adapter in {str(d)!r} does not match the model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return targets


def _exact_pattern(key: str) -> str:
    """A target pattern that matches exactly this module (fnmatch-escaped)."""
    module, _, s = key.partition(":")
    esc = "".join(f"[{c}]" if c in "*?[" else c for c in module)
    return f"{esc}:{s}" if s else esc


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]):
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if not missing and not unexpected:
        model.load_state_dict(state, strict=False)
    return missing, unexpected
