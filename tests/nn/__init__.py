"""Tests of pspnet_fast.nn."""
