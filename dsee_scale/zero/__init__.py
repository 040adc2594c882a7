"""The only code that knows about ZeRO-3 partitioned parameters and issues collectives.

Under ZeRO-3 each rank holds a shard of every parameter; outside `gathered(...)` a parameter
has shape [0] and its real shape in `ds_shape`. Everything here also works on a plain model
(no DeepSpeed, or ZeRO stage < 3), where it does nothing special. Collectives and the device
rule are in `comm.py`.

Private DeepSpeed / transformers internals dsee-scale relies on (all read here or in the
checkpoint reader, `dsee_scale/checkpoint/reader.py`), checked against deepspeed 0.19.x and
transformers 5.x:
- `param.ds_id`, `ds_shape`, `ds_numel`, `ds_tensor`: ZeRO-3 parameter attributes (stage3
  partitioning; `ds_tensor` is the rank's flat partition, filled by `fill_own_partitions`);
- `deepspeed.zero.GatheredParameters(params, modifier_rank=...)` semantics for in-place edits;
- `transformers.integrations.HfDeepSpeedConfig`: a live instance makes `from_pretrained` /
  `from_config` build under `deepspeed.zero.Init` (held by `partitioned_loading`);
- the ZeRO-3 checkpoint layout: `zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt` holding
  `param_shapes`, `frozen_param_shapes`, `frozen_param_fragments`, `buffer_names`,
  `shared_params`, `optimizer_state_dict.fp32_flat_groups` (keys from
  `deepspeed.checkpoint.constants` where it defines them), as `zero_to_fp32.py` reads it;
- `deepspeed.checkpoint.ds_to_universal` (run as a module) and `checkpoint.load_universal`;
- `param.ds_status` (`ZeroParamStatus`): whether a parameter is gathered now (`GatheredPeak`);
- `engine.was_step_applied()` and `get_global_grad_norm()` after a skipped (non-finite) step.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from . import comm

K = TypeVar("K")
_live_hf_configs: list[Any] = []  # HfDeepSpeedConfig objects: alive while models load partitioned


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also while partitioned (then its own shape is [0])."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def placement(p: torch.Tensor) -> torch.device:
    """Where new tensors that work beside parameter `p` belong: the rank's accelerator device
    for a partitioned parameter (its own .data is an empty placeholder), else p's device."""
    return comm.device() if is_partitioned(p) else p.device


class GatheredPeak:
    """The most bytes of whole (gathered) ZeRO-3 parameters a rank held at once while
    `sampling()`: sampled at the end of every module's forward (gradient checkpointing's
    recomputed forwards included), the moment ZeRO-3 still holds that module's parameters
    beside any it prefetched or kept live (stage3_max_live_parameters) and the persistent small
    ones. Memory beyond the partitions that is not gathered parameters (activations, buffers,
    the allocator's) is not in it. It costs one pass over the parameters' status per module
    call, so only the first `first` uses of each kind are sampled: once DeepSpeed's trace is
    complete (the second step) every step gathers alike, and later steps pay nothing. The
    trainer samples its training steps and held-out loss, not generation."""

    def __init__(self, models: Sequence[nn.Module], first: int = 3):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.gone = ZeroParamStatus.NOT_AVAILABLE
        self.params: list[Any] = [p for m in models for p in m.parameters() if is_partitioned(p)]
        self.peak, self.first, self.uses = 0, first, Counter[str]()

    def held(self) -> int:
        """Bytes of the parameters gathered (or in flight) right now."""
        return sum(full_numel(p) * p.element_size() for p in self.params if p.ds_status != self.gone)

    def _sample(self, module: nn.Module, args: Any, output: Any) -> None:
        self.peak = max(self.peak, self.held())

    @contextlib.contextmanager
    def sampling(self, kind: str) -> Iterator[None]:
        """Sample the forwards inside, the first `first` times for this kind of work."""
        self.uses[kind] += 1
        if self.uses[kind] > self.first:
            yield
            return
        handle = torch.nn.modules.module.register_module_forward_hook(self._sample)
        try:
            yield
        finally:
            handle.remove()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Inside: the full parameters on every rank. With modifier_rank, that rank's in-place
    changes are broadcast to all and re-partitioned on exit (DeepSpeed's rule for edits)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def use_in_forward(module: nn.Module, param: torch.Tensor) -> None:
    """`module`'s forward reads `param` of a submodule outside that submodule's forward: ZeRO-3
    must gather it for the whole of module's forward (nothing to do on a plain model)."""
    if is_partitioned(param):
        import deepspeed

        deepspeed.zero.register_external_parameter(module, param)


def partitioned_loading(ds_config: dict) -> None:
    """Make transformers build / load the next models partitioned (under zero.Init) for this
    ZeRO-3 engine config: the HfDeepSpeedConfig object must stay alive, so it is kept here."""
    from transformers.integrations import HfDeepSpeedConfig

    _live_hf_configs[:] = [HfDeepSpeedConfig(ds_config)]


@contextlib.contextmanager
def whole_loading():
    """Inside: transformers builds models whole (as without ZeRO-3), even while an earlier
    `partitioned_loading` is live (e.g. a meta-device skeleton built after a partitioned model)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not _live_hf_configs:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(_live_hf_configs[-1])


def fill_own_partitions(model: nn.Module, read: Callable[[str, int, int], torch.Tensor]) -> None:
    """Write each partitioned parameter's own shard on this rank straight from its source, with
    no gather and no collective: read(name, start, end) gives elements [start, end) of the
    flattened full tensor. DeepSpeed cuts a parameter of n elements into world partitions of
    ceil(n / world), rank r holding [r * size, (r + 1) * size) (the last one padded), in
    `param.ds_tensor`; so each rank reads 1/world of the model and never holds a full layer."""
    rank, _ = comm.rank_and_world()
    with torch.no_grad():
        for name, p in model.named_parameters():
            shard = p.ds_tensor  # type: ignore[attr-defined]
            start = rank * shard.numel()
            end = min(start + shard.numel(), full_numel(p))
            if end > start:
                shard.narrow(0, 0, end - start).copy_(read(name, start, end))


def full_tensors_one_per_rank(
    items: Sequence[tuple[K, torch.Tensor, Callable[[], torch.Tensor]]],
) -> Iterator[tuple[int, tuple[K, torch.Tensor] | None]]:
    """Hand out full tensors in waves of `world`: rank j gets the j-th item of each wave.

    items: (key, the partitioned parameter, a function reading the wanted full tensor from it
    while gathered). In a wave every rank joins each item's gather (a collective) and keeps a
    float32 copy of its own item only, so no rank holds more than one gathered layer beyond its
    shard. Yields (items handed out so far, this rank's (key, tensor) or None) per wave."""
    rank, world = comm.rank_and_world()
    for start in range(0, len(items), world):
        mine = None
        for j, (key, param, read) in enumerate(items[start : start + world]):
            with gathered([param]):
                if j == rank:
                    mine = (key, read().detach().float().clone())
        yield min(start + world, len(items)), mine


def copy_full_into(
    model: nn.Module, name: str, src: torch.Tensor | Callable[[], torch.Tensor], rank: int, writer: int = 0
) -> None:
    """Write the full tensor `src` into parameter / buffer `name` (partitioned or not): gathered
    alone, written by rank `writer` and broadcast to the others (a partitioned parameter is
    re-partitioned on exit). `src` may be a function: only the writer calls it, so reads can be
    spread over ranks by `writer`. Every rank calls this for the same names in the same order."""
    target: torch.Tensor
    try:
        target = model.get_parameter(name)
    except AttributeError:
        target = model.get_buffer(name)
    with torch.no_grad(), gathered([target], modifier_rank=writer):
        if rank == writer:
            if callable(src):
                src = src()
            if tuple(target.shape) != tuple(src.shape):
                raise RuntimeError(f"{name}: source shape {tuple(src.shape)} != model {tuple(target.shape)}")
            target.copy_(src.to(target.device, target.dtype))
        if not is_partitioned(target):  # a buffer, or a model outside ZeRO-3
            comm.broadcast_into(target, writer)
