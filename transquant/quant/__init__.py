"""Fake quantization of transformers: quantizers, range estimators, sites, and the verb."""
