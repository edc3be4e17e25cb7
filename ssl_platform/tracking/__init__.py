"""MLflow: one run per training run (params, metrics, tags, the exported encoder as an artifact) in
:mod:`~ssl_platform.tracking.mlflow_runs`, and the model registry in :mod:`~ssl_platform.tracking.model_registry`,
where ``promote`` registers a run's or a sweep's best encoder and moves an alias only when it beats the holder.
Reads only the spec's ``tracking`` section."""
