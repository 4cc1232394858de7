"""Attention modules built on nlgraph's core op (``nlgraph.aggregate``)."""

from .multihead import MultiheadAttention, attention_graph

__all__ = ["MultiheadAttention", "attention_graph"]
