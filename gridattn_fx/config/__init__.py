"""User options: one validated config object, per-site options, presets."""

from .options import GridAttnConfig
from .sites import SiteOptions

__all__ = ["GridAttnConfig", "SiteOptions"]
