"""Ray itself: connect to the cluster of ``RAY_ADDRESS`` or start a small local instance, sized for this machine."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster of ``RAY_ADDRESS`` (``ray job submit``) or start a small local instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Train V2 patches print() in workers to also log it, which shows every progress line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Worker start-up on a small, busy machine can take longer than Train V2's default 60 s.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    # Train V2's PreemptionWatcher (cloud node-drain notices, unused by our loop) makes every run print a core
    # worker error line ("constructor arguments in the object store and max_restarts > 0"); set it to 1 to keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    _quiet_default_token_notice()
    cpus = num_cpus or int(os.environ.get("SSL_PLATFORM_NUM_CPUS", 0)) or max(2, os.cpu_count() or 2)
    ray.init(
        num_cpus=cpus,
        object_store_memory=local_object_store_bytes(),
        include_dashboard=True,  # Train V2's placement-group cleanup needs the State API (dashboard)
        dashboard_host="127.0.0.1",
        dashboard_port=int(os.environ.get("SSL_PLATFORM_DASHBOARD_PORT", 0)) or free_port(),
        log_to_driver=True,
        runtime_env={
            "env_vars": {"PYTHONPATH": _pythonpath(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"},
            "worker_process_setup_hook": "ssl_platform.training.ray_runtime.pin_ray_address",
        },
    )


TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_default_token_notice() -> None:
    _add_filter(TOKEN_NOTICE_LOGGER, "Token authentication is enabled for this Ray cluster")


class _DropNotice:
    """A logging filter that drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _add_filter(logger: str, prefix: str) -> None:
    import logging

    log = logging.getLogger(logger)
    if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in log.filters):
        log.addFilter(_DropNotice(prefix))


LOCAL_OBJECT_STORE_MB = 2048


def local_object_store_bytes(total_memory: int | None = None) -> int:
    """The object store of a local instance: ``SSL_PLATFORM_OBJECT_STORE_MB`` or 2 GiB, at most 30% of RAM (Ray's
    own default share). Ray Data's decoded batches live there: under 200 MB its executor ran one decode task at a
    time ("backpressured: ResourceBudget"); 2 GiB gave 1.2-1.4x the decoded images/s on 2 cores (measured). Shared
    memory is used only as objects are stored."""
    raw = os.environ.get("SSL_PLATFORM_OBJECT_STORE_MB", "")
    if raw:
        try:
            mb = int(raw)
        except ValueError:
            raise ValueError(f"SSL_PLATFORM_OBJECT_STORE_MB: expected a whole number of MB, got {raw!r}") from None
        if mb < 80:
            raise ValueError(f"SSL_PLATFORM_OBJECT_STORE_MB: expected at least 80 (Ray's minimum object store), got {mb}")
        return mb * 1024**2
    if total_memory is None:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(LOCAL_OBJECT_STORE_MB * 1024**2, max(80 * 1024**2, int(0.3 * total_memory)))


def pin_ray_address() -> None:
    """Worker setup hook: point the State API at this cluster (it cannot guess when several run locally), and drop
    Ray Data's "Progress bars disabled" notice there (the platform turns the bars off on purpose)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    _add_filter("ray.data._internal.progress", "Progress bars disabled")


def train_worker_threads(assigned: int, node_cpus: float, local_workers: int) -> int:
    """Torch intra-op threads of a Train worker of a CPU-only run that streams its data (``image_folder``,
    ``shards``): its share of the node's CPUs (``node_cpus / local_workers``), at least ``assigned`` (Ray's
    ``OMP_NUM_THREADS``, its ``cpus_per_worker``; 0: torch's default, kept).

    Such a run also computes on the CPUs it leaves to Ray Data's decode tasks: decoding into canvases takes a few %
    of a core per step there (issue 31: 10 CPU-s for 320 JPEGs over a 240 s DINO epoch on 2 cores, while the step
    ran on 1 thread), so those CPUs idled. The decode tasks take their turns beside the step's threads, as a
    ``DataLoader``'s worker processes do beside a training process. GPU runs and in-memory data (where the CPUs
    left may be other trials') keep ``assigned`` (the caller decides)."""
    if assigned <= 0:
        return assigned
    return max(assigned, int(node_cpus // max(local_workers, 1)))


def node_cpus() -> float:
    """The CPUs of the Ray node this process runs on (0 when unknown)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return next((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["NodeID"] == node and n["Alive"]), 0.0)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pythonpath() -> str:
    """The workers' PYTHONPATH: this repository, the submitting directory (a plug-in method's package,
    ``method.name: my_pkg.module:Class``, imports there as in the driver) and the caller's PYTHONPATH."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parts = [here, os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))
