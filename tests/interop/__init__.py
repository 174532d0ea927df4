"""Tests of pspnet_fast.interop."""
