"""The virtual-axis algebra of layout/collectives.py against the collectives simulated on labels.

Every element of a rank's q is labelled with its token and its feature (head x channel); the
views of diffusers' Ulysses and the all-to-all itself (block r of every rank's input, in rank order)
are run on those labels for all P ranks in one process, and the algebra's prediction of every
element's token and feature must match, on every rank.
"""

import math

import pytest
import torch

from gridattn_fx.layout import collectives as C
from gridattn_fx.layout.facts import Tokens

B, IMAGE, H, D = 2, (4, 4), 4, 3
S = math.prod(IMAGE)


def _fact(**kw):
    return Tokens(dim=1, prefix=0, image_shape=IMAGE, suffix=0, order=(0, 1), origin="test", batch=(0,), **kw)


def _evaluate(spread: C.Scattered, rank: int):
    """The token and the feature the algebra says each element holds."""
    def axis_values(virtual, which):
        sizes = [n for n, *_ in virtual]
        value = torch.zeros(sizes or [1], dtype=torch.long)
        for i, v in enumerate(virtual):
            shape = [1] * len(virtual)
            shape[i] = v[0]
            value = value + torch.arange(v[0]).reshape(shape) * v[which]
        return value.reshape(-1)

    out = []
    for which in (1, 2):
        total = torch.zeros([1] * len(spread.axes), dtype=torch.long)
        for d, virtual in enumerate(spread.axes):
            shape = [1] * len(spread.axes)
            values = axis_values(virtual, which)
            shape[d] = values.numel()
            total = total + values.reshape(shape)
        rank_value, index = 0, rank
        for n, tw, fw, _ in reversed(spread.rank):  # row-major decomposition of the rank index
            weight = tw if which == 1 else fw
            rank_value, index = rank_value + (index % n) * weight, index // n
        out.append(total + rank_value)
    return out


def _labels(p, order=None):
    tokens = torch.arange(S).reshape(1, S, 1, 1).expand(B, S, H, D)
    if order is not None:
        tokens = tokens[:, order]
    features = torch.arange(H * D).reshape(1, 1, H, D).expand(B, S, H, D)
    chunk = S // p
    return [(t[:, r * chunk:(r + 1) * chunk], f[:, r * chunk:(r + 1) * chunk])
            for r in range(p) for t, f in [(tokens, features)]]


def _ulysses_forward(x, p):
    b, s, h, d = x.shape
    return x.reshape(b, s, p, h // p, d).permute(2, 1, 0, 3, 4).contiguous().flatten()


def _ulysses_after(x, p, shape):
    b, s, h, d = shape
    return x.reshape(p, s, b, h // p, d).flatten(0, 1).permute(1, 0, 2, 3)


def _all_to_all(flat_per_rank, p):
    return [torch.cat([flat.chunk(p)[r] for flat in flat_per_rank]) for r in range(p)]


@pytest.mark.parametrize("p", [2, 4])
def test_ulysses_exchange_matches_the_simulated_all_to_all(p):
    ranks = _labels(p)
    shape = ranks[0][0].shape
    sent = [[_ulysses_forward(t, p) for t, _ in ranks], [_ulysses_forward(f, p) for _, f in ranks]]
    received = [_all_to_all(sent[0], p), _all_to_all(sent[1], p)]
    for r in range(p):
        spread = C.scatter(_fact(shard=(r, p)), shape)
        spread = C.view(spread, (B, S // p, p, H // p, D))
        spread = C.permute(spread, (2, 1, 0, 3, 4))
        spread = C.view(spread, (B * S * H * D // p,))
        spread = C.exchange(spread, p, r)
        spread = C.view(spread, (p, S // p, B, H // p, D))
        spread = C.view(spread, (S, B, H // p, D))
        spread = C.permute(spread, (1, 0, 2, 3))
        token, feature = _evaluate(spread, r)
        assert torch.equal(token, _ulysses_after(received[0][r], p, shape))
        assert torch.equal(feature, _ulysses_after(received[1][r], p, shape))
        gathered = C.gathered(spread)
        assert gathered.dim == 1 and not gathered.shard and gathered.partial and not gathered.groups


def test_the_chunk_must_be_the_ranks_own():
    spread = C.view(C.scatter(_fact(shard=(1, 2)), (B, S // 2, H, D)), (B, S // 2, 2, H // 2, D))
    spread = C.view(C.permute(spread, (2, 1, 0, 3, 4)), (B * S * H * D // 2,))
    assert C.exchange(spread, 2, 0) is None   # rank 0 holding chunk 1: the other blocks are unknown
    assert C.exchange(spread, 2, 1) is not None


def test_grid_group_order_is_recognized_and_its_chunks_hold_whole_groups():
    gh, gw = 2, 2
    hh, ww = IMAGE
    spread = C.scatter(_fact(), (B, S, H * D))
    spread = C.view(spread, (B, hh // gh, gh, ww // gw, gw, H * D))
    spread = C.permute(spread, (0, 2, 4, 1, 3, 5))
    spread = C.view(spread, (B, S, H * D))
    grouped = C.gathered(spread)
    assert grouped is not None and C.grouped_by(grouped, (gh, gw)) and not C.grouped_by(grouped, (1, 2))
    # the order itself: group (r, c) holds the tokens at rows = r mod 2, columns = c mod 2
    token, _ = _evaluate(C.scatter(grouped, (B, S, H * D)), 0)
    rows, cols = token[0, :, 0] // ww, token[0, :, 0] % ww
    group = (rows % gh) * gw + cols % gw
    assert torch.equal(group, torch.arange(S) // (S // (gh * gw)))
    # chunk 1 of 2 is groups 2 and 3: its tokens, as the algebra tracks them from the rank
    chunk = C.scatter(Tokens(**{**grouped.__dict__, "shard": (1, 2)}), (B, S // 2, H * D))
    token, _ = _evaluate(chunk, 1)
    expected = group.reshape(1, S)[:, S // 2:]
    assert torch.equal(((token[0, :, 0] // ww) % gh) * gw + (token[0, :, 0] % ww) % gw, expected[0])


def test_a_transposed_order_is_not_read_as_groups():
    hh, ww = IMAGE
    spread = C.view(C.scatter(_fact(), (B, S, H * D)), (B, hh, ww, H * D))
    spread = C.view(C.permute(spread, (0, 2, 1, 3)), (B, S, H * D))
    assert C.gathered(spread) is None


@pytest.mark.parametrize("p", [2, 4])
def test_the_round_trip_returns_every_element_to_its_chunk(p):
    """Ulysses' pair: gather the sequence for a share of the heads, scatter back; the output of
    attention holds the query's tokens and heads, so the round trip is the identity on labels, and
    the algebra proves it (what passes/local_groups.py relies on to drop the pair)."""
    ranks = _labels(p)
    shape = ranks[0][0].shape
    b, s, h, d = shape
    gathered = [[_ulysses_after(x, p, shape) for x in _all_to_all([_ulysses_forward(t[i], p) for t in ranks], p)]
                for i in range(2)]

    def back(x):
        return x.reshape(b, p, s, h // p, d).permute(1, 3, 0, 2, 4).contiguous().flatten()

    returned = [[y.reshape(p, h // p, b, s, d).flatten(0, 1).permute(1, 2, 0, 3)
                 for y in _all_to_all([back(x) for x in gathered[i]], p)] for i in range(2)]
    for r in range(p):
        home = C.scatter(_fact(shard=(r, p)), shape)
        spread = C.view(C.permute(C.view(home, (b, s, p, h // p, d)), (2, 1, 0, 3, 4)), (b * s * h * d,))
        spread = C.permute(C.view(C.exchange(spread, p, r), (p * s, b, h // p, d)), (1, 0, 2, 3))
        spread = C.view(C.permute(C.view(spread, (b, p, s, h // p, d)), (1, 3, 0, 2, 4)), (b * s * h * d,))
        spread = C.permute(C.view(C.exchange(spread, p, r), (p * (h // p), b, s, d)), (1, 2, 0, 3))
        token, feature = _evaluate(spread, r)
        assert torch.equal(token, returned[0][r]) and torch.equal(feature, returned[1][r])
        assert C.same_elements(spread, home)
        assert not C.same_elements(C.permute(spread, (0, 1, 2, 3)), C.permute(home, (0, 1, 3, 2)))


def test_group_order_is_read_only_off_a_row_major_image():
    """The same views on a column-major sequence reorder sequence places, not image positions."""
    hh, ww = IMAGE
    column_major = Tokens(dim=1, prefix=0, image_shape=IMAGE, suffix=0, order=(1, 0), origin="test", batch=(0,))
    spread = C.view(C.scatter(column_major, (B, S, H * D)), (B, hh // 2, 2, ww // 2, 2, H * D))
    spread = C.view(C.permute(spread, (0, 2, 4, 1, 3, 5)), (B, S, H * D))
    assert C.gathered(spread) is None


@pytest.mark.parametrize("image, stride, ranks", [((8, 8), (2, 2), 2), ((4, 8, 8), (1, 2, 2), 4), ((4, 6, 4), (2, 3, 2), 3)])
def test_local_grid_attention_on_each_ranks_groups_is_the_grid_semantics(image, stride, ranks):
    """passes/local_groups.py's replacement: tokens in group-major order (built here from each token's
    grid group, a stable sort), split in equal chunks, attention within each chunk's contiguous
    groups; put back in place, the masked oracle's output in float64."""
    from oracle import assert_close64, oracle_sdpa

    from gridattn_fx.grid import TokenLayout
    from gridattn_fx.passes.local_groups import local_grid_attention

    n = math.prod(image)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in image], indexing="ij"), -1).reshape(n, -1)
    group = torch.zeros(n, dtype=torch.long)
    for axis, g in enumerate(stride):
        group = group * g + coords[:, axis] % g
    order = torch.sort(group, stable=True).indices
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    per_group = n // math.prod(stride)
    chunks = [local_grid_attention(*(t[:, order].chunk(ranks, dim=1)[r] for t in (q, k, v)), per_group)
              for r in range(ranks)]
    got = torch.empty_like(q)
    got[:, order] = torch.cat(chunks, dim=1)
    layout = TokenLayout(0, image_shape=image)
    expected = oracle_sdpa(*(t.transpose(1, 2) for t in (q, k, v)), q_layout=layout, k_layout=layout,
                           stride=stride).transpose(1, 2)
    assert_close64(got, expected)
