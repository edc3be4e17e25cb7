"""MLflow: one run per training run (params, metrics, tags, the exported encoder as an artifact) in
:mod:`~ssl_platform.tracking.mlflow_runs`, written through a per-process queue and background sender so that a
tracking server that is down never stops or stalls training (:mod:`~ssl_platform.tracking.run_log`,
:mod:`~ssl_platform.tracking.outbox`; unsent records kept beside the checkpoints and replayed by
:mod:`~ssl_platform.tracking.sync`), and the model registry in :mod:`~ssl_platform.tracking.model_registry`,
where ``promote`` registers a run's or a sweep's best encoder and moves an alias only when it beats the holder.
Reads the spec's ``tracking`` section (and ``checkpoint.uri``, where unsent records are kept)."""
