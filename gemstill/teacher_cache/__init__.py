"""The teacher logit cache: per-token top-k (or sampled) teacher log-probs, computed once and read by distillation."""
