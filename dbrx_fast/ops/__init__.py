"""Differentiable entry points: one torch.autograd.Function per fused op, one file per op.

(One file per op rather than a single ops.py: each op's Function, its checks and its launch choices read together.)
"""
