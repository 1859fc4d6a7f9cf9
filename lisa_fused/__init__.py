"""lisa_fused: LISA fine-tuning with a fused AdamW over a packed buffer of only the active layers."""

__all__ = ["FusedLISA"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `from lisa_fused import FusedLISA` imports the optimizer (and torch) on first use only (PEP 562),
    # so that `lisa-fused --help` and its argument errors answer before torch is imported.
    if name == "FusedLISA":
        from .optimizer import FusedLISA

        globals()["FusedLISA"] = FusedLISA
        return FusedLISA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
