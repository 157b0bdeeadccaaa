"""Device kernels (Triton). Import through :mod:`quantkit.backend`; triton is an optional dependency."""
