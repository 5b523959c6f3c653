"""Optimizers. TEMPORARY placeholder until the fused Lion lands (issue 4)."""
