"""Tests of pspnet_fast.benchmarks."""
