"""Small real models used to measure quantization on real activations (tests, benchmarks)."""
