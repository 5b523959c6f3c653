"""torch ops over the compiled kernels: one module per op, plus plain-torch references."""
