"""Images in, uint8 batches out, views on the device: small in-memory sets (digits, CIFAR-10, generated images),
image folders listed once on the driver (local or ``s3://``), shards written by ``prepare-data`` with a manifest,
Ray Data streaming that decodes on the cluster's CPUs, and the batched views (crops, flips, jitter, multi-crop)
that the Train worker makes on its device. Depends on :mod:`ssl_platform.storage` for URIs and retries."""
