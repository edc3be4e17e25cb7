"""A message while a run waits for cluster resources: what it asked for and what the cluster has.

Ray Train places a run's workers as one placement group (one bundle per worker). When the cluster cannot hold it
-- too few CPUs/GPUs free, ``STRICT_SPREAD`` with fewer nodes than workers, a node lost mid-run and not yet
replaced -- Ray waits silently until it can. :class:`ResourceWaitNotice` watches, from the driver, the pending
placement groups of the run's shape and prints one line every ``every_s`` seconds while one waits, e.g.::

    [ssl_platform] waiting 40s for resources: the run asks for 2 workers x {CPU: 1} (placement STRICT_SPREAD: one
    worker per node); the cluster has 2 alive nodes (1 large enough for a worker), CPU 2 free of 2 in all;
    STRICT_SPREAD needs 2 nodes that each fit a worker; it starts when they fit

and a line when the workers are placed. Only Ray's public State calls are used (``placement_group_table``,
``nodes``, ``available_resources``, ``cluster_resources``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

PENDING_STATES = ("PENDING", "RESCHEDULING")
_STRATEGY_NOTE = {
    "PACK": "as few nodes as possible",
    "SPREAD": "over nodes when possible",
    "STRICT_SPREAD": "one worker per node",
    "STRICT_PACK": "all on one node",
}


def _fmt_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if v and not k.startswith(("node:", "bundle_group"))
             and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def pending_groups(bundle: dict[str, float], num_workers: int) -> list[dict[str, Any]]:
    """Pending placement groups with ``num_workers`` bundles equal to ``bundle`` (the run's worker group)."""
    from ray.util import placement_group_table

    want = {k: float(v) for k, v in bundle.items() if v}
    out = []
    for info in placement_group_table().values():
        bundles = list((info.get("bundles") or {}).values())
        if info.get("state") in PENDING_STATES and len(bundles) == num_workers and all(
            {k: float(v) for k, v in b.items() if v} == want for b in bundles
        ):
            out.append(info)
    return out


def describe_wait(bundle: dict[str, float], num_workers: int, strategy: str, waited_s: float) -> str:
    """The line printed while waiting: the request, the cluster's nodes and free/total resources."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    fit = sum(1 for n in alive if all(n.get("Resources", {}).get(k, 0) >= v for k, v in bundle.items() if v))
    total, free = ray.cluster_resources(), ray.available_resources()
    have = ", ".join(
        f"{k} {free.get(k, 0):g} free of {total.get(k, 0):g} in all" for k in sorted(bundle) if bundle[k]
    )
    note = _STRATEGY_NOTE.get(strategy, "")
    hint = ""
    if strategy == "STRICT_SPREAD" and fit < num_workers:
        hint = f"; STRICT_SPREAD needs {num_workers} nodes that each fit a worker"
    return (
        f"[ssl_platform] waiting {waited_s:.0f}s for resources: the run asks for {num_workers} workers x "
        f"{_fmt_resources(bundle)} (placement {strategy}{': ' + note if note else ''}); the cluster has "
        f"{len(alive)} alive node{'s' if len(alive) != 1 else ''} ({fit} large enough for a worker), {have}{hint}; "
        f"it starts when they fit"
    )


class ResourceWaitNotice:
    """Context manager: a daemon thread that reports while the run's worker group waits for resources."""

    def __init__(self, bundle: dict[str, float], num_workers: int, strategy: str = "PACK", *,
                 first_after_s: float = 10.0, every_s: float = 30.0, poll_s: float = 2.0, out: IO[str] | None = None):
        self.bundle, self.num_workers, self.strategy = dict(bundle), int(num_workers), strategy
        self.first_after_s, self.every_s, self.poll_s = first_after_s, every_s, poll_s
        self.out = out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_scaling(cls, scaling, **kwargs) -> ResourceWaitNotice:
        """The notice for the worker group of the spec's ``scaling`` section."""
        sc = scaling
        bundle = {"CPU": float(sc.cpus_per_worker)}
        if sc.use_gpu:
            bundle["GPU"] = float(sc.gpus_per_worker)
        return cls(bundle, sc.num_workers, sc.placement_strategy, **kwargs)

    def _print(self, line: str) -> None:
        out = self.out or sys.stdout
        out.write(line + "\n")
        out.flush()

    def _watch(self) -> None:
        since: float | None = None
        last_said = 0.0
        while not self._stop.wait(self.poll_s):
            try:
                waiting = bool(pending_groups(self.bundle, self.num_workers))
                now = time.monotonic()
                if waiting:
                    since = since or now
                    due = now - since >= self.first_after_s and (last_said == 0.0 or now - last_said >= self.every_s)
                    if due:
                        self._print(describe_wait(self.bundle, self.num_workers, self.strategy, now - since))
                        last_said = now
                elif since is not None:
                    if last_said:
                        self._print(f"[ssl_platform] resources found after {now - since:.0f}s: the workers are placed")
                    since, last_said = None, 0.0
            except Exception:  # noqa: BLE001 - a notice must never break the run (e.g. Ray shutting down)
                continue

    def __enter__(self) -> ResourceWaitNotice:
        self._thread = threading.Thread(target=self._watch, name="ssl-resource-wait", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
