"""Declared layouts at a model's edge: what an input holds when the model cannot prove it.

Flux, LTX-Video and other latent transformers receive tokens that the pipeline packed outside the
model; no graph can prove them an image. ``gridattn_fx.prepare(model, inputs, hidden_states=
ImageTokens(...))`` declares it; the declaration is evaluated at every call, checked against the
call's tensor, and carried to the attention sites by the layout analysis like a proven fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

Size = Union[int, Callable[[dict], int]]
# A callable may also return a 0-d tensor (an input's value); it is read as an int.


def _check_size(name: str, value, minimum: int) -> None:
    if callable(value):
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ImageTokens.{name} must be an int or a callable of the call's arguments, got {value!r}")
    if value < minimum:
        raise ValueError(f"ImageTokens.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class ImageTokens:
    """An input whose axis ``dim`` holds ``prefix`` non-image tokens, then a ``height x width`` image
    in raster order (row-major; ``transposed=True``: column-major), then ``suffix`` tokens. With
    ``frames`` the image is a video of ``frames x height x width`` tokens, frame by frame (time
    slowest, each frame in raster order): LTX-Video's packed latents. ``frames=1`` is an image.

    Each size is an int or a callable that receives the call's arguments by name (a dict, as bound
    to ``model.forward``'s signature, defaults applied) and returns an int, so that the layout
    follows each call::

        gridattn_fx.prepare(transformer, example_kwargs,
                            hidden_states=ImageTokens.from_position_ids("img_ids"))
        gridattn_fx.prepare(model, (tokens,), x=ImageTokens(height=lambda a: a["h"], width=lambda a: a["w"]))
        gridattn_fx.prepare(ltx_transformer, example_kwargs, hidden_states=ImageTokens(
            frames=lambda a: a["num_frames"], height=lambda a: a["height"], width=lambda a: a["width"]))
    """

    height: Size
    width: Size
    prefix: Size = 0
    suffix: Size = 0
    dim: int = 1
    transposed: bool = False
    frames: Size | None = None

    def __post_init__(self):
        if self.frames is not None:
            _check_size("frames", self.frames, 1)
        _check_size("height", self.height, 1)
        _check_size("width", self.width, 1)
        _check_size("prefix", self.prefix, 0)
        _check_size("suffix", self.suffix, 0)
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise TypeError(f"ImageTokens.dim must be an int, got {self.dim!r}")
        if not isinstance(self.transposed, bool):
            raise TypeError(f"ImageTokens.transposed must be a bool, got {self.transposed!r}")

    @classmethod
    def from_position_ids(cls, ids_argument: str, row: int = 1, col: int = 2, prefix: Size = 0) -> "ImageTokens":
        """Sizes read from a (tokens, k) position-id input holding each token's row and column, as
        Flux's ``img_ids`` (columns 1 and 2): height = max row + 1, width = max column + 1. The ids
        are checked to be exactly the raster order of that grid at every call."""
        def height(args):
            return _raster_ids(args, ids_argument, row, col)[0]

        def width(args):
            return _raster_ids(args, ids_argument, row, col)[1]

        return cls(height=height, width=width, prefix=prefix)

    def resolve(self, input_name: str, arguments: dict) -> tuple:
        """(prefix, height, width, suffix) for one call, (prefix, frames, height, width, suffix) for a
        video; ValueError naming the input when a size cannot be computed or is not an int >= its
        minimum (1 for the image sizes, 0 for prefix and suffix)."""
        out = []
        fields = (("prefix", 0), *((("frames", 1),) if self.frames is not None else ()), ("height", 1), ("width", 1),
                  ("suffix", 0))
        for field_name, minimum in fields:
            value = getattr(self, field_name)
            if callable(value):
                try:
                    value = value(arguments)
                except Exception as err:
                    raise ValueError(f"declared layout of input '{input_name}': computing {field_name} failed "
                                     f"({type(err).__name__}: {err})") from err
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = int(value.item())
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"declared layout of input '{input_name}': {field_name} must be an int >= "
                                 f"{minimum}, got {value!r}")
            out.append(value)
        return tuple(out)


def _raster_ids(args: dict, name: str, row: int, col: int) -> tuple[int, int]:
    if name not in args:
        raise ValueError(f"no input named '{name}' (position ids)")
    ids = args[name]
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3):
        raise ValueError(f"position ids '{name}' must be a (tokens, k) or (batch, tokens, k) tensor")
    ids = ids[0] if ids.dim() == 3 else ids
    rows, cols = ids[:, row].round().long(), ids[:, col].round().long()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    # The declaration is only true when the tokens are that grid in raster order.
    r = torch.arange(height, device=ids.device).repeat_interleave(width)
    c = torch.arange(width, device=ids.device).repeat(height)
    if rows.numel() != height * width or not (torch.equal(rows, r) and torch.equal(cols, c)):
        raise ValueError(f"position ids '{name}' are not a {height}x{width} grid in raster order")
    return height, width
