"""Tests of pspnet_fast.ops."""
