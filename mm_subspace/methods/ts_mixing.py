"""Two-subspaces-mixing LoRA (MoSLoRA paper §2.2): a fixed butterfly mixer [[I, I], [I, I]]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import LowRankConfig
from ..errors import ConfigError
from ..layer import LowRankAdapter
from ..registry import register_method


@dataclass
class TSMixingConfig(LowRankConfig):
    """TS-Mixing: rank must be even (A and B are split into two halves, each of rank r/2)."""

    method = "ts_mixing"

    def __post_init__(self) -> None:
        super().__post_init__()
        odd = [v for v in [self.rank, *self.rank_pattern.values()] if v % 2]
        if odd:
            raise ConfigError(
                f"ts_mixing splits the rank into two sub-spaces, so it must be even; got rank(s) {odd}. "
                f"Use rank={self.rank + (self.rank % 2)}."
            )


def butterfly(r: int, dd: dict[str, Any]) -> torch.Tensor:
    """The r×r butterfly factor [[I, I], [I, I]] with r/2 × r/2 identity blocks (MoSLoRA Eq. 6)."""
    half = torch.eye(r // 2, **dd)
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, half], 1)], 0)


@register_method
class TSMixing(LowRankAdapter):
    """``x(A1 + A2)(B1 + B2)`` (MoSLoRA Eq. 3) = ``s · B · [[I, I], [I, I]] · A · x`` (Eq. 6).

    The mixer is a fixed (non-trainable) buffer; it is saved with the adapter so files are
    self-describing, and folds exactly into B on export.
    """

    config_class = TSMixingConfig
    mixer_trainable = False
    formula = "s·B·[[I,I],[I,I]]·A"
    paper = "Wu et al. 2024, MoSLoRA Eq. (3), (6), Table 1"

    def make_mixer(self, r: int, dd: dict[str, Any]) -> torch.Tensor:
        return butterfly(r, dd)
