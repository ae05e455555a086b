"""Clusterwise training: k-means (exogenous) and HeTLM (endogenous, actor-critic)."""
