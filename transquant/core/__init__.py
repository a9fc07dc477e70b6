"""Shared plumbing: errors, caching, MLflow tracking, config validation, paths, provenance, registries."""
