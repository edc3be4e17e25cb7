"""``make bench``: method step throughput, platform overhead, SALT's compute claim, data pipeline, MFU.

Run ``python -m benchmarks.run --help``. Results: ``benchmarks/results/<machine>.json`` and the generated table
in ``benchmarks/README.md``. Performance is measured here, never asserted with timings in tests.
"""
