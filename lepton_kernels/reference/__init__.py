"""Pure-torch implementations: the ground truth for tests and the CPU fallback.

They favour clarity over speed, accumulate in float32 (float64 when given float64 inputs) and
run on any device torch supports.
"""
