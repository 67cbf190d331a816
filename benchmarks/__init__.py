"""Benchmarks of lightning-localsgd (not tests): each module writes JSON + PNG under ``benchmarks/results/``."""
