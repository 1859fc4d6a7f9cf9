"""lisa_fused: LISA fine-tuning with a fused AdamW over a packed buffer of only the active layers."""
from .optimizer import FusedLISA

__all__ = ["FusedLISA"]
__version__ = "0.1.0"
