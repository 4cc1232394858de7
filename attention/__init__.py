"""Attention modules built on nlgraph's core op (``nlgraph.aggregate``)."""

from .criss_cross import CrissCrossAttention
from .multihead import MultiheadAttention, attention_graph

__all__ = ["MultiheadAttention", "CrissCrossAttention", "attention_graph"]
