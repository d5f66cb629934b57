"""User options: one validated config object, per-site options, presets."""

from .options import GridAttnConfig

__all__ = ["GridAttnConfig"]
