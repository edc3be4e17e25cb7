"""What a user launches: one run (:mod:`~ssl_platform.launch.run`: pre-flight, MLflow run, fit, result table),
a chain of stages that hand encoder checkpoints on (SALT stage 1 -> stage 2), the pre-flight that refuses bad
data or storage before Ray starts, and job submission to a cluster (``submit``, ``status``, ``logs``, ``stop``),
which validates runs, sweeps and chains locally first. The top floor: nothing in the package imports it but the
command line."""
