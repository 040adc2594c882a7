"""DSEEConfig: what to inject, where, and how the sparse support is chosen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

SupportMethod = Literal["grebsmo", "svd", "magnitude", "random", "gradient"]


@dataclass
class DSEEConfig:
    """The `dsee:` section of an experiment.

    target_modules: module-name patterns (fnmatch; "q_proj" matches any module whose name ends
    in ".q_proj"). A fused q/k/v projection (GPT-2 c_attn) is targeted per slice with ":q",
    ":k" or ":v". Empty means the architecture's q and v (archs.py, default_targets).
    """

    r: int = 8
    alpha: float = 16.0
    num_sparse: int = 64  # N: non-zeros of S per targeted matrix (or slice)
    sparse_density: float | None = None  # instead of num_sparse: N = density x rows x cols
    target_modules: list[str] = None  # type: ignore[assignment]
    support: SupportMethod = "grebsmo"
    seed: int = 0
    dropout: float = 0.0
    init_a: Literal["kaiming", "normal"] = "kaiming"
    grebsmo_rounds: int = 100
    grebsmo_relative_threshold: float = 0.25  # GreBsmo's hard threshold, x RMS(W) of each matrix
    grebsmo_rank_fraction: float = 0.65  # V stops growing at this fraction of min(out, in)
    svd_rank: int = 16
    gradient_batches: int = 8  # support "gradient": calibration micro-batches of the train data
    keep_zeros: bool = False  # the update only where W != 0 (a pruned W stays sparse when merged)

    def __post_init__(self):
        if self.target_modules is None:
            self.target_modules = []

    def validate(self, section: str = "dsee") -> None:
        if self.r <= 0:
            raise ConfigError(f"{section}.r: got {self.r}, must be an integer >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"{section}.alpha: got {self.alpha}, must be > 0")
        if self.num_sparse < 0:
            raise ConfigError(f"{section}.num_sparse: got {self.num_sparse}, must be >= 0")
        if self.sparse_density is not None and not 0.0 <= self.sparse_density <= 1.0:
            raise ConfigError(
                f"{section}.sparse_density: got {self.sparse_density}, must be in [0, 1] "
                "(a fraction of each matrix's entries, e.g. 0.01)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{section}.dropout: got {self.dropout}, must be in [0, 1)")
        if self.grebsmo_rounds < 1:
            raise ConfigError(f"{section}.grebsmo_rounds: got {self.grebsmo_rounds}, must be >= 1")
        if self.grebsmo_relative_threshold < 0:
            raise ConfigError(f"{section}.grebsmo_relative_threshold: must be >= 0")
        if not 0.0 < self.grebsmo_rank_fraction <= 1.0:
            raise ConfigError(
                f"{section}.grebsmo_rank_fraction: got {self.grebsmo_rank_fraction}, must be in (0, 1]"
            )
        if self.gradient_batches < 1:
            raise ConfigError(f"{section}.gradient_batches: got {self.gradient_batches}, must be >= 1")
        if self.svd_rank < 1:
            raise ConfigError(f"{section}.svd_rank: got {self.svd_rank}, must be >= 1")
        for pat in self.target_modules:
            if not pat or pat.count(":") > 1 or (":" in pat and pat.split(":")[1] not in ("q", "k", "v")):
                raise ConfigError(
                    f"{section}.target_modules: bad pattern {pat!r}; use a module name pattern, "
                    "optionally with :q, :k or :v for a fused qkv projection"
                )

    def n_for(self, rows: int, cols: int) -> int:
        """N for a rows x cols matrix: num_sparse, or round(sparse_density x rows x cols)."""
        if self.sparse_density is None:
            return self.num_sparse
        return min(rows * cols, round(self.sparse_density * rows * cols))

    def scaling(self) -> float:
        return self.alpha / self.r
