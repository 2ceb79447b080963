"""Pure computations on attention arrays: no plotting, no torch."""
