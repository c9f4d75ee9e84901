"""Substep-throughput benchmarks of the pi-Flow policies: a CLI table (``python -m bench``), a
pytest-benchmark suite (``bench/test_bench_*.py``) and a prepared GPU check (``python -m bench.gpu_check``).
"""
