"""Kernels: the fused zero-init attention op (Triton) and its eager reference."""

from .reference import zero_init_attention_ref
from .zero_init_attn import zero_init_attention

__all__ = ["zero_init_attention", "zero_init_attention_ref"]
