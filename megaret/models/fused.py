"""Projections fused into one column-parallel GEMM, their rows grouped head by head.

RetNet's q, k, v and g projections read the same input: one GEMM of their stacked weights
replaces four. The rows are grouped by head, as megatron's fused QKV groups them by query group:

    fused rows = [q_0, k_0, v_0, g_0, q_1, k_1, v_1, g_1, ...]    (x_h: head h's rows of x)

so cutting the fused weight into TP contiguous pieces gives each TP rank its own heads' rows of
all four, for any TP size (the checkpoint's full tensor does not depend on the layout it was
trained at), and a rank's output splits per head into q, k, v, g. `FusedRows` is that layout in
one place: the layer builds and splits with it, the arch spec names it (megaret.models.spec), and
checkpoints saved with separate projections are converted with it (megaret.checkpoint.upgrade).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedRows:
    """`fused` holds the rows of `parts` (module names, in this order) grouped head by head;
    `head_rows[i]`: the rows of one head in part i; `heads`: the heads of the full weight."""

    fused: str
    parts: tuple[str, ...]
    head_rows: tuple[int, ...]
    heads: int

    @property
    def rows(self) -> int:
        """Rows of the full fused weight."""
        return self.heads * sum(self.head_rows)

    def group(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused tensor from the parts' full tensors ((H * head_rows[i], ...) each)."""
        h = self.heads
        per_head = [p.reshape(h, r, *p.shape[1:]) for p, r in zip(parts, self.head_rows, strict=True)]
        grouped = torch.cat(per_head, dim=1)  # (H, sum(head_rows), ...)
        return grouped.reshape(self.rows, *grouped.shape[2:])

    def split(self, fused: torch.Tensor) -> list[torch.Tensor]:
        """The parts' full tensors from the fused one (the inverse of `group`)."""
        per_head = fused.reshape(self.heads, sum(self.head_rows), *fused.shape[1:])
        return [p.reshape(self.heads * r, *fused.shape[1:]).contiguous()
                for p, r in zip(per_head.split(self.head_rows, dim=1), self.head_rows, strict=True)]

    def init_method(self, base: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
        """An init for the full fused weight that draws exactly what separate projections drew: each
        part as its own tensor with `base`, in order (one big draw would give other numbers), then
        grouped. (megatron initialises the full weight on CPU, then keeps this TP rank's rows.)"""

        def init(weight: torch.Tensor) -> None:  # (rows, in_features)
            parts = []
            for r in self.head_rows:
                part = torch.empty(self.heads * r, *weight.shape[1:], dtype=weight.dtype)
                base(part)
                parts.append(part)
            with torch.no_grad():
                weight.copy_(self.group(parts))

        return init


def qkvg_rows(hidden: int, num_heads: int, value_factor: int, scope: str = "") -> FusedRows:
    """RetNet's fused q/k/v/g projection (per head Dk, Dk, Dv, Dv rows); module names under `scope`."""
    dk, dv = hidden // num_heads, value_factor * hidden // num_heads
    names = ("q_proj", "k_proj", "v_proj", "g_proj")
    return FusedRows(f"{scope}qkvg_proj", tuple(scope + n for n in names), (dk, dk, dv, dv), num_heads)
