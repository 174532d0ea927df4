"""Tests of pspnet_fast.training."""
