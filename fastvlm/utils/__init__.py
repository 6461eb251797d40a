"""Small helpers shared across the package: atomic file writes, config-key checks,
and the saved-activation meter the tests and benchmarks use."""
