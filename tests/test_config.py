"""Configuration: GridAttnConfig, from_options, TokenLayout, and bad options everywhere."""

import dataclasses
import re

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, TokenLayout  # noqa: E402

try:
    from torch._dynamo.exc import BackendCompilerFailed
except ImportError:  # pragma: no cover
    BackendCompilerFailed = RuntimeError


def _stride_pair(s):
    return (s, s) if isinstance(s, int) else tuple(s)


def test_defaults():
    cfg = GridAttnConfig()
    assert _stride_pair(cfg.stride) == (2, 2)
    assert cfg.min_image_tokens == 1024
    assert tuple(cfg.include) == () and tuple(cfg.exclude) == ()
    assert cfg.implementation == "grouped"
    assert cfg.strict is False


def test_from_options_splits_inductor_options():
    cfg, inductor_opts = GridAttnConfig.from_options(
        {"stride": (2, 4), "min_image_tokens": 0, "implementation": "masked",
         "include": [r"blocks\.0"], "strict": True, "max_autotune": False})
    assert _stride_pair(cfg.stride) == (2, 4)
    assert cfg.min_image_tokens == 0
    assert cfg.implementation == "masked"
    assert [str(p) if isinstance(p, str) else p.pattern for p in cfg.include] == [r"blocks\.0"]
    assert cfg.strict is True
    assert inductor_opts == {"max_autotune": False}


def test_from_options_empty_and_none():
    cfg, ind = GridAttnConfig.from_options({})
    assert ind == {} and _stride_pair(cfg.stride) == (2, 2)


BAD_OPTIONS = [
    # (options, exception types, key the message must name)
    ({"strid": 2}, ValueError, "strid"),
    ({"stride": 0}, ValueError, "stride"),
    ({"stride": -2}, ValueError, "stride"),
    ({"stride": (2, 0)}, ValueError, "stride"),
    ({"stride": (2, 2, 2, 2)}, (ValueError, TypeError), "stride"),  # triples are strides
    ({"stride": 2.0}, TypeError, "stride"),
    ({"stride": "2"}, TypeError, "stride"),
    ({"stride": (2, 1.5)}, TypeError, "stride"),
    ({"implementation": "bogus"}, ValueError, "implementation"),
    ({"min_image_tokens": -1}, ValueError, "min_image_tokens"),
    ({"min_image_tokens": "many"}, TypeError, "min_image_tokens"),
    ({"include": 5}, TypeError, "include"),
    ({"include": "blocks"}, TypeError, "include"),  # a bare string is not a list of regexes
    ({"include": [1]}, TypeError, "include"),
    ({"include": ["("]}, ValueError, "include"),
    ({"exclude": ["[unclosed"]}, ValueError, "exclude"),
    ({"strict": "yes"}, TypeError, "strict"),
]


@pytest.mark.parametrize("opts,exc,key", BAD_OPTIONS, ids=[str(o[0]) for o in BAD_OPTIONS])
def test_from_options_rejects_bad_values(opts, exc, key):
    with pytest.raises(exc, match=key):
        GridAttnConfig.from_options(opts)


@pytest.mark.parametrize("opts,exc,key",
                         [o for o in BAD_OPTIONS if o[2] != "strid"],
                         ids=[str(o[0]) for o in BAD_OPTIONS if o[2] != "strid"])
def test_constructor_rejects_bad_values(opts, exc, key):
    with pytest.raises(exc, match=key):
        GridAttnConfig(**opts)


def test_rewrite_rejects_bad_options():
    m = build(ViT, depth=1)
    x = image(1, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        gridattn_fx.rewrite(m, (x,), stride=0)
    with pytest.raises(ValueError, match="bogus_key"):
        gridattn_fx.rewrite(m, (x,), bogus_key=1)


@pytest.mark.parametrize("opts,key", [({"strid": 2}, "strid"), ({"stride": 0}, "stride"),
                                      ({"implementation": "bogus"}, "implementation"),
                                      ({"include": ["("]}, "include")])
def test_torch_compile_rejects_bad_options(opts, key):
    # Dynamo calls the backend lazily and may wrap its error: match the message, not the type only
    m = build(ViT, depth=1)
    c = torch.compile(m, backend="gridattn", options=opts)
    with pytest.raises((ValueError, TypeError, BackendCompilerFailed), match=key):
        c(image(1, 8, 8))


def test_inductor_option_passes_through():
    m = build(ViT, depth=1, grid=(4, 4))
    x = image(2, 8, 8)
    c = torch.compile(m, backend="gridattn",
                      options={"stride": 2, "min_image_tokens": 0, "max_autotune": False})
    out = c(x)
    rep = gridattn_fx.last_report()
    assert rep.failure is None
    assert rep.site(r"blocks\.0\.attn").decision == "rewritten"
    with oracle_mode(m, (1, 4, 4), stride=2):
        assert_close64(out, m(x))


def test_token_layout():
    lay = TokenLayout(prefix=5, height=6, width=10, suffix=3)
    assert lay.length == 5 + 60 + 3
    assert lay.image_tokens == 60
    assert lay.transposed is False
    assert lay == TokenLayout(5, 6, 10, 3, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.height = 7
    assert hash(lay) == hash(TokenLayout(5, 6, 10, 3))


def test_token_layout_any_rank():
    """The 2-D constructor is the rank-2 case of ``image_shape=`` / ``order=``."""
    assert TokenLayout(1, 4, 6, 0, True) == TokenLayout(1, image_shape=(4, 6), order=(1, 0))
    assert TokenLayout(1, 4, 6) == TokenLayout(1, image_shape=(4, 6))
    video = TokenLayout(3, image_shape=(2, 4, 6), suffix=1)
    assert (video.rank, video.frames, video.height, video.width) == (3, 2, 4, 6)
    assert video.image_tokens == 48 and video.length == 52 and video.sizes == (3, 2, 4, 6, 1)
    assert str(video) == "3+2x4x6+1" and not video.transposed
    assert video.map_sizes(lambda s: 2 * s) == TokenLayout(6, image_shape=(4, 8, 12), suffix=2)
    with pytest.raises(ValueError, match="order"):
        TokenLayout(0, image_shape=(2, 4, 6), order=(0, 1))
    with pytest.raises(TypeError):
        TokenLayout(0, 4, 6, image_shape=(4, 6))


# Inductor options passed through ``options``: checked against torch._inductor.config's types.
BAD_INDUCTOR_OPTIONS = [
    ({"max_autotune": "yes"}, "max_autotune"),                 # bool
    ({"max_autotune": 1}, "max_autotune"),
    ({"compile_threads": True}, "compile_threads"),            # int | None: a bool is not an int here
    ({"compile_threads": 2.5}, "compile_threads"),
    ({"memory_pool": "everything"}, "memory_pool"),            # a Literal
    ({"cpp.cxx": "g++"}, "cpp.cxx"),                           # tuple[None, str]
    ({"triton.cudagraphs": "on"}, "triton.cudagraphs"),        # nested option
]


@pytest.mark.parametrize("opts,key", BAD_INDUCTOR_OPTIONS, ids=[str(o[0]) for o in BAD_INDUCTOR_OPTIONS])
def test_from_options_rejects_bad_inductor_option_types(opts, key):
    with pytest.raises(TypeError, match=rf"inductor option '{re.escape(key)}' must be .*got"):
        GridAttnConfig.from_options(opts)


def test_from_options_accepts_inductor_options_of_the_declared_type():
    good = {"max_autotune": True, "compile_threads": None, "memory_pool": "none",
            "cpp.cxx": (None, "g++"), "coordinate_descent_tuning": False}
    _, inductor_opts = GridAttnConfig.from_options({"stride": 2, **good})
    assert inductor_opts == good
    # every option's own default has its declared type
    import torch._inductor.config as inductor_config

    defaults = inductor_config.get_config_copy()
    for key in ("max_autotune", "compile_threads", "memory_pool", "cpp.cxx", "triton.cudagraphs"):
        GridAttnConfig.from_options({key: defaults[key]})


def test_mode_expands_to_its_inductor_options():
    from torch._inductor import list_mode_options

    cfg, inductor_opts = GridAttnConfig.from_options({"stride": 4, "mode": "max-autotune-no-cudagraphs"})
    assert _stride_pair(cfg.stride) == (4, 4)
    assert inductor_opts == dict(list_mode_options("max-autotune-no-cudagraphs"))
    assert inductor_opts["max_autotune"] is True
    _, explicit = GridAttnConfig.from_options({"mode": "max-autotune", "max_autotune": False})
    assert explicit["max_autotune"] is False          # explicit options win over the mode's
    with pytest.raises(ValueError, match="mode"):
        GridAttnConfig.from_options({"mode": "fastest"})
    with pytest.raises(TypeError, match="mode"):
        GridAttnConfig.from_options({"mode": 3})


def test_torch_compile_rejects_bad_inductor_option_type():
    m = build(ViT, depth=1)
    c = torch.compile(m, backend="gridattn", options={"stride": 2, "max_autotune": "yes"})
    with pytest.raises((TypeError, BackendCompilerFailed), match="max_autotune"):
        c(image(1, 8, 8))
