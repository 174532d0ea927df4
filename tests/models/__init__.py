"""Tests of pspnet_fast.models."""
