"""Speed benchmarks of jdl against a hand-written JAX loop and PyTorch (see BENCHMARKS.md)."""
