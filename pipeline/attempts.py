"""How many times each pack has started on a GPU worker, counted where a worker's death cannot lose it.

Ray bounds actor task retries (`max_task_retries`), but it also counts the attempts that reached a worker
still restarting (loading its model) and never ran: a slow restart could spend a batch's retries without
running it once more. So the GPU stage has Ray retry its packs without end and counts starts here, in one
small actor on the driver's node per run: a pack that has started `1 + limits.infer_retries` times, each
start ending with its worker, is given up. Its items are missing from the stream, so the driver runs them
again in a further pass (`limits.lost_item_passes`) or writes their error rows.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.rows import UNIT_ORDINAL

log = logging.getLogger(__name__)


class PackGivenUp(RuntimeError):
    """A pack whose earlier starts all ended with their GPU worker: not run again in this pass."""


def pack_key(rows: list[dict[str, Any]]) -> str:
    """The same pack on every retry: a hash of its units (item id, ordinal)."""
    units = sorted((str(r["item_id"]), int(r[UNIT_ORDINAL])) for r in rows)
    return hashlib.sha1(repr(units).encode()).hexdigest()


class PackAttempts:
    """The ledger: starts per pack, and the items of the packs given up, for one pass of a run."""

    def __init__(self, starts_allowed: int):
        self.starts_allowed = starts_allowed
        self.starts: collections.Counter[str] = collections.Counter()
        self.given_up: dict[str, int] = {}  # item id -> the starts its pack had

    def begin(self, key: str, item_ids: list[str]) -> bool:
        """Count a start of the pack `key`; False once it has had all the starts it is allowed."""
        self.starts[key] += 1
        if self.starts[key] <= self.starts_allowed:
            return True
        self.given_up.update(dict.fromkeys(item_ids, self.starts_allowed))
        return False

    def new_pass(self) -> None:
        """A further pass regroups the missing items into new packs, each with all its starts again."""
        self.starts.clear()
        self.given_up.clear()

    def items_given_up(self) -> dict[str, int]:
        return dict(self.given_up)


def start_ledger(infer_retries: int):
    """The run's ledger as a Ray actor on this (the driver's) node, which ends with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(PackAttempts)
    return actor.remote(1 + infer_retries)


@dataclass(frozen=True)
class PackStarts:
    """The GPU stage's side of the ledger (none outside Ray: every start is allowed)."""

    ledger: Any = None  # the actor handle of `start_ledger`
    infer_retries: int = 0

    def check(self, rows: list[dict[str, Any]]) -> None:
        """Count this start of the pack of `rows`; raise PackGivenUp if it has had its starts."""
        if self.ledger is None or not rows:
            return
        import ray

        items = sorted({str(r["item_id"]) for r in rows})
        try:
            allowed = ray.get(self.ledger.begin.remote(pack_key(rows), items))
        except Exception as e:  # no ledger (its node, the driver's, is gone): the run is ending anyway
            log.warning("the pack ledger is unreachable (%s); running the pack uncounted", e)
            return
        if not allowed:
            names = sorted({str(r["uri"]).rsplit("/", 1)[-1] for r in rows})
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise PackGivenUp(
                f"a pack of {len(rows)} unit(s) ({shown}) started on a GPU worker {1 + self.infer_retries} "
                f"time(s) and its worker died each time (limits.infer_retries={self.infer_retries}); its "
                "items are run again in a further pass or become error rows"
            )
