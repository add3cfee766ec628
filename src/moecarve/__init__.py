"""moecarve: carve dense Hugging Face decoders into native Mixture-of-Experts checkpoints."""

from moecarve.carve import CarveConfig, carve

__all__ = ["CarveConfig", "carve"]
