"""Ray Train: Ray itself (:mod:`~ssl_platform.training.ray_runtime`), the ``TorchTrainer`` and the worker loop as
named steps (:mod:`~ssl_platform.training.trainer`), its optimizer and schedules, distributed kNN and linear-probe
evaluation, step hooks, console progress, and ``fit`` as every run and sweep trial calls it (resource-wait notice,
failure handling, checkpoint pruning). Uses :mod:`~ssl_platform.data`, :mod:`~ssl_platform.storage` and
:mod:`~ssl_platform.tracking`; knows methods only through ``methods.registry``."""
