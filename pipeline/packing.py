"""Pack rows for the GPU stage by token budget, not by row count.

A 2-hour video window and a receipt must not count the same: a pack holds rows whose summed prompt cost
(visual + text tokens) stays within `max_pack_tokens`; a row larger than the budget travels alone.
In the Ray Data chain a pack is one row whose columns are lists (`pack_table`); the GPU stage turns it
back into unit rows (`unpack_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.rows import COST_COLUMN


@dataclass
class TokenBudgetPacker:
    """First-fit decreasing bin packing of row costs under a token budget."""

    max_pack_tokens: int

    def __post_init__(self) -> None:
        if self.max_pack_tokens <= 0:
            raise ValueError(f"max_pack_tokens must be positive, got {self.max_pack_tokens}")

    def pack(self, costs: Sequence[int]) -> list[list[int]]:
        """Group row indices into packs whose cost sums stay <= max_pack_tokens (None costs nothing)."""
        costs = [max(int(c or 0), 0) for c in costs]
        packs: list[list[int]] = []
        loads: list[int] = []
        # Largest first leaves the small rows to fill the gaps; ties keep arrival order so packs are stable.
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            cost = costs[i]
            for p, load in enumerate(loads):
                if load + cost <= self.max_pack_tokens:
                    packs[p].append(i)
                    loads[p] += cost
                    break
            else:
                packs.append([i])
                loads.append(cost)
        for p in packs:
            p.sort()
        packs.sort(key=lambda p: p[0])
        return packs


def pack_table(table: pa.Table, max_pack_tokens: int, cost_column: str = COST_COLUMN) -> pa.Table:
    """One output row per pack; every input column becomes a list column holding the pack's rows."""
    if table.num_rows == 0:
        return table
    packs = TokenBudgetPacker(max_pack_tokens).pack(table.column(cost_column).to_pylist())
    order = pa.array([i for p in packs for i in p], type=pa.int64())
    offsets = [0]
    for p in packs:
        offsets.append(offsets[-1] + len(p))
    # Large list offsets: a pack of video windows can exceed 2 GiB of pixels.
    offsets_arr = pa.array(offsets, type=pa.int64())
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_binary(column.type):
            column = column.cast(pa.large_binary())
        values = column.take(order).combine_chunks()
        columns[name] = pa.LargeListArray.from_arrays(offsets_arr, values)
    return pa.table(columns)


def unpack_table(packs: pa.Table) -> pa.Table:
    """Inverse of `pack_table`: the unit rows of all packs, in pack order."""
    return pa.table({name: pc.list_flatten(packs.column(name)) for name in packs.column_names})
