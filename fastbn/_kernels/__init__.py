"""Kernels: the math of fastbn, nothing else (no validation, no registry)."""
