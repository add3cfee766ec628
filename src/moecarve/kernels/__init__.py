"""Triton kernels for the carved models' MoE FFN (decode and batched), and their hook into transformers.

    import moecarve.kernels
    moecarve.kernels.enable(model)   # every Glm4MoeMoE block: routed + shared experts in one call

or, with transformers' experts interface (routed experts only):

    moecarve.kernels.register_experts_implementation()
    AutoModelForCausalLM.from_pretrained(path, experts_implementation="moecarve")

Importing this package does not import triton; the kernels load on first use and fall back to
the PyTorch reference (one warning) where Triton cannot run. See docs/kernels.md.
"""

from ._env import KernelWarning
from .functional import moe_ffn, moe_ffn_torch, triton_unsupported_reason
from .integration import disable, enable, experts_forward, register_experts_implementation
from .ops.reference import moe_ffn_reference

__all__ = [
    "KernelWarning",
    "disable",
    "enable",
    "experts_forward",
    "moe_ffn",
    "moe_ffn_reference",
    "moe_ffn_torch",
    "register_experts_implementation",
    "triton_unsupported_reason",
]
