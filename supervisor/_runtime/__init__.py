"""The sandbox runtime: one sandbox at a time, synchronous, on this host."""
