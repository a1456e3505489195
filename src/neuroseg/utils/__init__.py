"""Bottom layer: atomic writes, logging, hashing, distributed set-up. Imports nothing above it."""
