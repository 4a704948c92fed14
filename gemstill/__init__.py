"""gemstill: distill Gemma 3 teachers into small, fast, quantized students in JAX."""

__version__ = "0.1.0"
