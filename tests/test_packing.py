"""Token-budget packing: every row in exactly one pack, packs within budget, big rows alone."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest

from pipeline.packing import TokenBudgetPacker, pack_table, unpack_table


@pytest.mark.parametrize("seed", range(8))
def test_packs_cover_every_row_once_within_budget(seed):
    rng = random.Random(seed)
    budget = rng.choice([64, 500, 4096])
    costs = [rng.choice([0, 1, rng.randint(1, budget), rng.randint(budget, 3 * budget)]) for _ in range(60)]
    packs = TokenBudgetPacker(budget).pack(costs)

    flat = [i for p in packs for i in p]
    assert sorted(flat) == list(range(len(costs)))
    for p in packs:
        load = sum(costs[i] for i in p)
        assert load <= budget or len(p) == 1, (p, load)
    for i, c in enumerate(costs):
        if c > budget:
            assert [i] in packs
    assert len(packs) >= math.ceil(sum(min(c, budget) for c in costs) / budget)


def test_budget_not_row_count_decides():
    # One long video window fills a pack on its own; many small pages share one.
    costs = [900, 10, 10, 10, 10, 10, 10, 10, 10]
    packs = TokenBudgetPacker(1000).pack(costs)
    assert len(packs) == 1
    packs = TokenBudgetPacker(920).pack(costs)
    assert sorted(map(len, packs)) == [6, 3] or sum(costs[i] for i in packs[0]) <= 920
    assert all(sum(costs[i] for i in p) <= 920 for p in packs)


def test_rows_without_cost_ride_along():
    # Error rows reach the packer with no token count: they cost nothing and must not break packing.
    packs = TokenBudgetPacker(10).pack([None, 4, None, 6, 11])
    assert sorted(i for p in packs for i in p) == [0, 1, 2, 3, 4]
    assert [4] in packs and len(packs) == 2


def test_rejects_non_positive_budget():
    with pytest.raises(ValueError, match="max_pack_tokens"):
        TokenBudgetPacker(0)


def test_pack_table_round_trip_keeps_every_row_and_its_bytes():
    rows = [
        {"item_id": f"i{k}", "cost_tokens": c, "pixels": bytes([k]) * (c + 1), "text": None if k % 3 else "t"}
        for k, c in enumerate([5, 50, 120, 7, 300, 1, 0, 64])
    ]
    table = pa.Table.from_pylist(rows)
    packed = pack_table(table, max_pack_tokens=128)
    assert packed.num_rows < table.num_rows
    for k in range(packed.num_rows):
        one = unpack_table(packed.slice(k, 1))
        assert sum(one.column("cost_tokens").to_pylist()) <= 128 or one.num_rows == 1
    back = unpack_table(packed).to_pylist()
    key = lambda r: r["item_id"]
    assert sorted(back, key=key) == sorted(rows, key=key)


def test_pack_table_of_nothing_is_nothing():
    empty = pa.table({"cost_tokens": pa.array([], pa.int64())})
    assert pack_table(empty, 10).num_rows == 0
