"""Ray Tune sweeps over the same ``TorchTrainer``: the ``sweep:`` section (parameters, search, scheduler), the trial
function and Tune objects, the driver with its MLflow parent run and ``sweep`` command, and the report (trial rows,
table, CSV, plot). Built on :mod:`~ssl_platform.training`; launched like a run."""
