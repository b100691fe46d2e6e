"""krserve Python worker: mlx-lm generation over a msgpack-over-stdio protocol."""

__version__ = "0.1.0"
