"""Benchmarks shared by ``benchmarks/`` scripts and the ``memtx bench`` command."""
