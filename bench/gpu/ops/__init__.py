"""One benchmark module per op (parity + timing + the variants to precompile), called by the stages."""

MODULES = ("split", "reconstruct", "reconstruct_sum", "residual_codes", "gram")
