"""Where runs keep their bytes: ``s3://`` and local URIs (filesystems from the AWS configuration, an S3 filesystem
that retries with backoff, small files by URI), a run's checkpoints (one directory each, manifest written last;
listed, verified, pruned to ``checkpoint.keep``), verified local copies and uploads of them, and the checkpoint
arguments a method takes (SALT's frozen teacher): checked before Ray starts, downloaded in the workers. Knows
nothing of Ray Train, MLflow or the data; reads only the spec's ``checkpoint`` section."""
