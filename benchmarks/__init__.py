"""The benchmarks, installed as pspnet_fast.benchmarks: one script per thing measured (bench_*.py), registered in
registry.py, run by runner.py; suite.py is `pspnet-fast bench`."""
