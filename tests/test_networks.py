"""Tests of the denoiser networks F_θ: NCSN++ / DDPM++ (score_sde, jcm) and the ADM UNet (cm).

References used here are independent of the code under test: SciPy's ``upfirdn`` / ``correlate2d``
for FIR resampling, NumPy float64 formulas for embeddings and attention, and layer-by-layer
parameter counts written from the published architectures (score_sde / jcm ``ncsnpp.py``,
cm ``unet.py``) in plain Python.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from consistency_jax.networks import fir, get_network
from consistency_jax.networks import layers as L
from consistency_jax.networks.ncsnpp import DDPMpp, NCSNpp
from consistency_jax.networks.unet import IMAGENET64_CONFIG, LSUN256_CONFIG, ADMUNet


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------
def _random_params(shapes, seed: int = 0):
    """Random parameters of the given shapes: weights ~ N(0, 1/fan_in), GroupNorm scales ~ 1.

    Real initialisations zero the last convolution of every block (the output is then exactly 0),
    so behaviour checks use random parameters instead.
    """
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, leaf in flat[0]:
        name = jax.tree_util.keystr(path)
        if len(leaf.shape) >= 2:
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
        elif name.endswith("['W']"):  # Fourier frequencies.
            value = rng.normal(0.0, 16.0, leaf.shape)
        elif name.endswith("['scale']"):
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        leaves.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(flat[1], leaves)


def _key(seed: int):
    """A PRNG key whose random bits compile much faster on CPU than threefry's."""
    return jax.random.key(seed, impl="rbg")


def _apply_fn(module):
    return jax.jit(
        lambda p, x, c, y, key, train: module.apply(
            {"params": p}, x, c, y=y, train=train, rngs={"dropout": key}
        ),
        static_argnames="train",
    )


def _inputs(batch=2, size=8, channels=3, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    c = jnp.asarray(0.25 * np.log(rng.uniform(0.002, 80.0, size=batch)), jnp.float32)
    return x, c


def _rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _upfirdn_ref(x, k1, up, down, pad):
    """scipy.signal.upfirdn along H then W with a 1-D kernel, aligned to StyleGAN2's upfirdn_2d.

    Output n of the padded valid convolution is sample n + K − 1 − pad0 of the full convolution of
    the zero-upsampled signal (zero outside its support), then every ``down``-th sample is kept.
    """
    k1 = np.asarray(k1, np.float64)
    size = k1.shape[0]
    p0, p1 = pad
    for axis in (1, 2):
        n_in = x.shape[axis]
        full = signal.upfirdn(k1, x, up=up, down=1, axis=axis)
        n_out = n_in * up + p0 + p1 - size + 1
        idx = np.arange(n_out) + size - 1 - p0
        valid = (idx >= 0) & (idx < full.shape[axis])
        taken = np.take(full, np.clip(idx, 0, full.shape[axis] - 1), axis=axis)
        mask_shape = [1] * x.ndim
        mask_shape[axis] = n_out
        x = np.take(taken * valid.reshape(mask_shape), np.arange(0, n_out, down), axis=axis)
    return x


def _correlate_same(x, w):
    """'SAME' 2-D cross-correlation NHWC x HWIO with SciPy."""
    b, h, wd, ci = x.shape
    out = np.zeros((b, h, wd, w.shape[-1]))
    for n in range(b):
        for i in range(ci):
            for o in range(w.shape[-1]):
                out[n, :, :, o] += signal.correlate2d(x[n, :, :, i], w[:, :, i, o], mode="same")
    return out


# ------------------------------------------------------------------------------------------------
# Parameter counts written from the published layer lists (no Flax involved).
# ------------------------------------------------------------------------------------------------
def _ncsnpp_count(
    nf, ch_mult, nrb, attn, size, c_in=3, fourier=True, residual_pyramid=True, num_classes=None
):
    e = 4 * nf
    n = (nf if fourier else 0) + ((2 * nf if fourier else nf) * e + e) + (e * e + e)
    n += num_classes * e if num_classes else 0

    def res(cin, cout, resample=False):  # ResnetBlockBigGANpp
        k = 2 * cin + 9 * cin * cout + cout + e * cout + cout + 2 * cout + 9 * cout * cout + cout
        return k + (cin * cout + cout if cin != cout or resample else 0)

    def att(c):  # AttnBlockpp: GroupNorm + 4 NIN
        return 2 * c + 4 * (c * c + c)

    n += 9 * c_in * nf + nf
    ch, skips, r, pyr = nf, [nf], size, c_in
    for lvl, m in enumerate(ch_mult):
        for _ in range(nrb):
            n += res(ch, nf * m)
            ch = nf * m
            n += att(ch) if r in attn else 0
            skips.append(ch)
        if lvl < len(ch_mult) - 1:
            n += res(ch, ch, True)
            r //= 2
            if residual_pyramid:  # FIR 3x3 conv-downsample of the input pyramid
                n += 9 * pyr * ch + ch
                pyr = ch
            skips.append(ch)
    n += 2 * res(ch, ch) + att(ch)
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            n += res(ch + skips.pop(), nf * ch_mult[lvl])
            ch = nf * ch_mult[lvl]
        n += att(ch) if r in attn else 0
        if lvl:
            n += res(ch, ch, True)
            r *= 2
    return n + 2 * ch + 9 * ch * c_in + c_in


def _adm_count(
    model_channels,
    channel_mult,
    num_res_blocks,
    attention_resolutions,
    use_scale_shift_norm,
    num_classes,
    size,
    c_in=3,
    **_,
):
    mc = model_channels
    e = 4 * mc
    f = 2 if use_scale_shift_norm else 1
    n = mc * e + e + e * e + e + (num_classes * e if num_classes else 0)

    def res(cin, cout):  # cm ResBlock (identity skip unless the channels change)
        k = (
            2 * cin
            + 9 * cin * cout
            + cout
            + f * (e * cout + cout)
            + 2 * cout
            + 9 * cout * cout
            + cout
        )
        return k + (cin * cout + cout if cin != cout else 0)

    def att(c):  # cm AttentionBlock: norm, qkv 1x1 conv, proj_out
        return 2 * c + 3 * c * c + 3 * c + c * c + c

    ch = int(channel_mult[0] * mc)
    n += 9 * c_in * ch + ch
    skips, r = [ch], size
    for lvl, m in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            n += res(ch, int(m * mc))
            ch = int(m * mc)
            n += att(ch) if r in attention_resolutions else 0
            skips.append(ch)
        if lvl != len(channel_mult) - 1:
            n += res(ch, ch)  # resblock_updown
            r //= 2
            skips.append(ch)
    n += 2 * res(ch, ch) + att(ch)
    for lvl, m in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            n += res(ch + skips.pop(), int(m * mc))
            ch = int(m * mc)
            n += att(ch) if r in attention_resolutions else 0
            if lvl and i == num_res_blocks:
                n += res(ch, ch)
                r *= 2
    return n + 2 * ch + 9 * ch * c_in + c_in


# ------------------------------------------------------------------------------------------------
# Shared blocks.
# ------------------------------------------------------------------------------------------------
def test_fir_kernel_and_group_count():
    k = L.setup_fir_kernel([1, 3, 3, 1])
    np.testing.assert_allclose(k, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0, rtol=1e-7)
    with pytest.raises(ValueError, match="FIR kernel"):
        L.setup_fir_kernel(np.ones((2, 3)))
    assert [L.num_groups(c) for c in (4, 8, 12, 16, 128, 192, 256, 512)] == [
        1,
        2,
        3,
        4,
        32,
        32,
        32,
        32,
    ]
    assert (
        L.num_groups(132) == 22
    )  # min(32, 33) = 32 does not divide 132; the largest divisor below
    with pytest.raises(ValueError):
        L.num_groups(0)


@pytest.mark.parametrize(
    "up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 0)), (3, 1, (-1, 2))]
)
def test_upfirdn2d_matches_scipy(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 7, 3))
    k1 = np.array([1.0, 3.0, 3.0, 1.0])
    ref = _upfirdn_ref(x, k1, up, down, pad)
    # The 2-D kernel (depthwise convolution) and the 1-D separable kernel (strided slices) paths.
    for kernel in (np.outer(k1, k1), k1):
        ours = L.upfirdn2d(jnp.asarray(x, jnp.float32), kernel, up=up, down=down, pad=pad)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-4)
    # An asymmetric kernel catches a missing flip (true convolution, not correlation).
    k2 = np.array([1.0, 2.0, -0.5])
    ours = L.upfirdn2d(jnp.asarray(x, jnp.float32), k2, up=up, down=down, pad=pad)
    np.testing.assert_allclose(ours, _upfirdn_ref(x, k2, up, down, pad), atol=1e-4)


def test_fir_up_and_downsampling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 3))
    xj = jnp.asarray(x, jnp.float32)
    k1 = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0
    # StyleGAN2 conventions: up pads (2, 1) with gain factor², down pads (1, 1).
    np.testing.assert_allclose(L.upsample_2d(xj), _upfirdn_ref(x, 2 * k1, 2, 1, (2, 1)), atol=1e-5)
    np.testing.assert_allclose(L.downsample_2d(xj), _upfirdn_ref(x, k1, 1, 2, (1, 1)), atol=1e-5)
    assert L.upsample_2d(xj).shape == (2, 16, 16, 3) and L.downsample_2d(xj).shape == (2, 4, 4, 3)
    # A constant image stays constant away from the zero-padded border.
    ones = jnp.full((1, 8, 8, 1), 2.0)
    np.testing.assert_allclose(L.upsample_2d(ones)[:, 2:-2, 2:-2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(L.downsample_2d(ones)[:, 1:-1, 1:-1], 2.0, rtol=1e-6)
    # With the box kernel [1, 1] FIR resampling is nearest-neighbour / 2x2 mean.
    np.testing.assert_allclose(
        L.upsample_2d(xj, [1, 1]), np.repeat(np.repeat(x, 2, 1), 2, 2), atol=1e-6
    )
    np.testing.assert_allclose(
        L.downsample_2d(xj, [1, 1]), x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), atol=1e-6
    )
    np.testing.assert_allclose(L.naive_upsample_2d(xj), np.repeat(np.repeat(x, 2, 1), 2, 2))
    np.testing.assert_allclose(
        L.naive_downsample_2d(xj), x.reshape(2, 4, 2, 4, 2, 3).mean((2, 4)), atol=1e-6
    )


def test_fused_fir_convolutions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 10, 10, 2))
    w = rng.normal(size=(3, 3, 2, 3))
    xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    up = np.asarray(L.upsample_conv_2d(xj, wj))
    down = np.asarray(L.conv_downsample_2d(xj, wj))
    assert up.shape == (1, 20, 20, 3) and down.shape == (1, 5, 5, 3)
    # Away from the border, the fused ops equal "FIR-resample, then 3x3 convolution" (the operations
    # commute; only the zero padding is applied once instead of twice).
    up_ref = _correlate_same(_upfirdn_ref(x, np.array([1, 3, 3, 1]) / 4.0, 2, 1, (2, 1)), w)
    np.testing.assert_allclose(up[:, 3:-3, 3:-3], up_ref[:, 3:-3, 3:-3], atol=1e-4)
    down_ref = _upfirdn_ref(_correlate_same(x, w), np.array([1, 3, 3, 1]) / 8.0, 1, 2, (1, 1))
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], down_ref[:, 1:-1, 1:-1], atol=1e-4)
    # Everywhere (borders included) they equal StyleGAN2's definition: a stride-2 transposed
    # convolution with the spatially flipped kernel (scatter form), then the FIR with padding (1, 1).
    t = np.zeros((1, 21, 21, 3))
    wf = w[::-1, ::-1]
    for i in range(10):
        for j in range(10):
            t[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] += np.einsum("c,abco->abo", x[0, i, j], wf)
    np.testing.assert_allclose(
        up, _upfirdn_ref(t, np.array([1, 3, 3, 1]) / 4.0, 1, 1, (1, 1)), atol=1e-4
    )
    # ... and FIR with padding (2, 2) followed by a valid stride-2 correlation.
    f = _upfirdn_ref(x, np.array([1, 3, 3, 1]) / 8.0, 1, 1, (2, 2))
    d = np.stack(
        [
            [
                np.einsum("abc,abco->o", f[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3], w)
                for j in range(5)
            ]
            for i in range(5)
        ]
    )[None]
    np.testing.assert_allclose(down, d, atol=1e-4)


def test_embeddings_match_numpy():
    c = np.array([-1.3, 0.0, 0.37, 2.5])
    for dim, endpoint, sin_first in [(16, True, True), (17, False, False), (8, False, True)]:
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / ((half - 1) if endpoint else half))
        args = c[:, None] * freqs[None]
        ref = np.concatenate(
            [np.sin(args), np.cos(args)] if sin_first else [np.cos(args), np.sin(args)], axis=1
        )
        if dim % 2:
            ref = np.pad(ref, ((0, 0), (0, 1)))
        ours = L.sinusoidal_embedding(
            jnp.asarray(c, jnp.float32), dim, endpoint=endpoint, sin_first=sin_first
        )
        np.testing.assert_allclose(ours, ref, atol=1e-5)

    proj = L.GaussianFourierProjection(embedding_size=6, scale=16.0)
    params = proj.init(jax.random.key(0), jnp.zeros(4))["params"]
    w = np.asarray(params["W"], np.float64)
    assert 3.0 < np.abs(w).max()  # drawn with standard deviation 16
    args = 2 * np.pi * c[:, None] * w[None]
    np.testing.assert_allclose(
        proj.apply({"params": params}, jnp.asarray(c, jnp.float32)),
        np.concatenate([np.sin(args), np.cos(args)], 1),
        atol=1e-4,
    )
    grad = jax.grad(lambda p: proj.apply({"params": p}, jnp.asarray(c, jnp.float32)).sum())(params)
    assert float(jnp.abs(grad["W"]).max()) == 0.0  # the frequencies are never trained


def test_attention_block_matches_numpy():
    block = L.AttnBlock(num_heads=2, skip_rescale=True, norm_eps=1e-6)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 3, 8))
    params = _random_params(
        jax.eval_shape(block.init, jax.random.key(0), jnp.zeros(x.shape))["params"]
    )
    ours = jax.jit(block.apply)({"params": params}, jnp.asarray(x, jnp.float32))

    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    g = x.reshape(2, 9, 2, 4)  # GroupNorm, 2 groups of 4 channels
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    g = g.reshape(2, 9, 8) * p["GroupNorm_0"]["scale"] + p["GroupNorm_0"]["bias"]
    q, k, v = (g @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"] for i in range(3))
    heads = []
    for hd in range(2):
        sl = slice(4 * hd, 4 * hd + 4)
        logits = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / 2.0
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append((weights / weights.sum(-1, keepdims=True)) @ v[..., sl])
    h = np.concatenate(heads, -1) @ p["Dense_3"]["kernel"] + p["Dense_3"]["bias"]
    ref = (x + h.reshape(x.shape)) / np.sqrt(2.0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_group_norm_matches_numpy_and_flax():
    rng = np.random.default_rng(4)
    x = rng.normal(loc=3.0, scale=2.0, size=(2, 5, 5, 12))
    gn = L.GroupNorm(num_groups=3, epsilon=1e-6)
    params = _random_params(gn.init(jax.random.key(0), jnp.zeros(x.shape))["params"])
    assert set(params) == {"scale", "bias"}
    ours = gn.apply({"params": params}, jnp.asarray(x, jnp.float32))
    g = x.reshape(2, 25, 3, 4)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
    ref = g.reshape(x.shape) * np.asarray(params["scale"], np.float64) + np.asarray(params["bias"])
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    flax_gn = nn.GroupNorm(num_groups=3, epsilon=1e-6)
    np.testing.assert_allclose(
        ours, flax_gn.apply({"params": params}, jnp.asarray(x, jnp.float32)), atol=1e-5
    )
    # bfloat16 input: statistics in float32, output in bfloat16.
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = gn.apply({"params": params}, xb)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), ref, atol=0.05)
    # Reverse- and forward-mode derivatives equal flax's.
    f_ours = lambda z: gn.apply({"params": params}, z)
    f_flax = lambda z: flax_gn.apply({"params": params}, z)
    xj, tj = jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    np.testing.assert_allclose(
        jax.jvp(f_ours, (xj,), (tj,))[1], jax.jvp(f_flax, (xj,), (tj,))[1], atol=1e-4
    )
    np.testing.assert_allclose(
        jax.grad(lambda z: (f_ours(z) * tj).sum())(xj),
        jax.grad(lambda z: (f_flax(z) * tj).sum())(xj),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="5 groups do not divide 12"):
        L.GroupNorm(num_groups=5).init(jax.random.key(0), jnp.zeros(x.shape))


def _old_layers(monkeypatch):
    """Swap in the slower formulations the fast ones replaced: flax's GroupNorm, 2-D FIR kernels
    (depthwise convolutions) and ``jax.nn.dot_product_attention``."""
    monkeypatch.setattr(L, "GroupNorm", nn.GroupNorm)
    monkeypatch.setattr(
        fir, "_fir_taps", lambda k, scale=1.0: fir.setup_fir_kernel(k) * np.float32(scale)
    )
    monkeypatch.setattr(L, "_attention", lambda q, k, v: jax.nn.dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "arch,derivatives",
    [
        ("ncsnpp", False),
        ("adm", False),
        pytest.param("ncsnpp", True, marks=pytest.mark.slow),
        pytest.param("adm", True, marks=pytest.mark.slow),
    ],
)
def test_fast_layers_compute_what_the_old_ones_did(arch, derivatives, monkeypatch):
    """The networks' outputs (and, in the slow tier, gradients and jvps) are unchanged by the faster
    GroupNorm, separable FIR and einsum attention, on the same parameter tree. The quick form checks
    the outputs only; each layer's derivatives are checked on its own above (GroupNorm against flax)."""
    if arch == "ncsnpp":
        net = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    else:
        net = ADMUNet(
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_classes=None,
            attention_resolutions=(4,),
            num_head_channels=4,
            dropout=0.0,
        )
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    c = jnp.asarray([-1.0, 0.5], jnp.float32)
    tx = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run():
        params = _random_params(jax.eval_shape(lambda: net.init(jax.random.key(0), x, c))["params"])
        f = lambda p, z: net.apply({"params": p}, z, c)
        if not derivatives:
            return params, jax.jit(f)(params, x), [], jnp.zeros(())
        # One program for the three (one compilation, not three).
        y, g, t = jax.jit(
            lambda p: (
                f(p, x),
                jax.grad(lambda q: (f(q, x) * tx).sum())(p),
                jax.jvp(lambda z: f(p, z), (x,), (tx,))[1],
            )
        )(params)
        return params, y, g, t

    p_new, y_new, g_new, t_new = run()
    with monkeypatch.context() as m:
        _old_layers(m)
        p_old, y_old, g_old, t_old = run()
    assert jax.tree.structure(p_new) == jax.tree.structure(p_old)
    assert L.count_params(p_new) == L.count_params(p_old)
    scale = float(jnp.abs(y_old).max())
    assert scale > 0.1
    np.testing.assert_allclose(y_new, y_old, atol=1e-5 * max(1.0, scale))
    np.testing.assert_allclose(t_new, t_old, atol=1e-4 * max(1.0, float(jnp.abs(t_old).max())))
    assert len(jax.tree.leaves(g_new)) == len(jax.tree.leaves(g_old))
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, float(jnp.abs(b).max())))


def test_ncsnpp_cifar10_parameter_count():
    n = L.count_params(L.abstract_params(NCSNpp(), 32))
    print(f"NCSN++ CIFAR-10 (jcm cifar10_ve_cd): {n:,} parameters")
    assert n == _ncsnpp_count(128, (2, 2, 2), 4, (16,), 32) == 56_395_651
    assert abs(n - 56e6) / 56e6 < 0.02  # "about 56M" (CM's NCSN++, EDM's CIFAR-10 architecture)
    m = L.count_params(L.abstract_params(DDPMpp(), 32))
    print(f"DDPM++ CIFAR-10 (jcm cifar10_k_vp): {m:,} parameters")
    assert m == _ncsnpp_count(128, (2, 2, 2), 4, (16,), 32, fourier=False, residual_pyramid=False)
    # EDM (Karras et al. 2022) Table 7 lists 55.73 M for this DDPM++ (EDM's adds 1,152 for its
    # augmentation labels) and 61.80 M for score_sde's DDPM++ cont. with ch_mult (1, 2, 2, 2).
    assert abs(m - 55.73e6) < 0.01e6
    assert (
        abs(L.count_params(L.abstract_params(DDPMpp(ch_mult=(1, 2, 2, 2)), 32)) - 61.80e6) < 0.01e6
    )


def test_adm_parameter_counts():
    n = L.count_params(L.abstract_params(ADMUNet.imagenet64(), 64))
    print(f"ADM ImageNet-64 (cm): {n:,} parameters")
    assert n == _adm_count(size=64, **IMAGENET64_CONFIG)
    assert abs(n - 295.90e6) < 0.01e6  # EDM Table 7: ADM ImageNet-64, 295.90 M
    m = L.count_params(L.abstract_params(ADMUNet.lsun256(), 256))
    print(f"ADM LSUN-256 (cm): {m:,} parameters")
    assert m == _adm_count(size=256, **LSUN256_CONFIG)
    assert ADMUNet() == ADMUNet.imagenet64()  # the defaults are the ImageNet-64 network


# ------------------------------------------------------------------------------------------------
# Tiny networks: behaviour.
# ------------------------------------------------------------------------------------------------
TINY_NCSNPP = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.2)
TINY_ADM = dict(
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_head_channels=8,
    dropout=0.2,
)


def test_ncsnpp_tiny_behaviour():
    net = NCSNpp(num_classes=3, **TINY_NCSNPP)
    x, c = _inputs()
    y = jnp.array([0, 2])
    # "rbg" keys compile several times faster than threefry ones on CPU (initialisers, dropout).
    key = _key(0)
    params = jax.jit(net.init)(key, x, c, y)["params"]
    assert L.count_params(params) == _ncsnpp_count(8, (1, 2), 1, (4,), 8, num_classes=3)
    apply = _apply_fn(net)
    out0 = apply(params, x, c, y, key, train=False)
    assert out0.shape == x.shape and out0.dtype == jnp.float32
    assert float(jnp.abs(out0).max()) == 0.0  # init_scale = 0: zero-initialised output convolution

    params = _random_params(params)
    out = apply(params, x, c, y, key, train=False)
    assert float(jnp.abs(out).max()) > 1e-3
    np.testing.assert_array_equal(out, apply(params, x, c, y, _key(5), train=False))
    d1 = apply(params, x, c, y, _key(1), train=True)
    d2 = apply(params, x, c, y, _key(2), train=True)
    assert _rel_err(d1, out) > 1e-3 and _rel_err(d1, d2) > 1e-3  # dropout active when training
    np.testing.assert_array_equal(d1, apply(params, x, c, y, _key(1), train=True))
    assert _rel_err(apply(params, x, c, jnp.array([1, 0]), key, train=False), out) > 1e-3
    assert _rel_err(apply(params, x, c + 0.5, y, key, train=False), out) > 1e-3
    # The two examples are processed independently.
    other = apply(params, x, c.at[0].add(1.0), y, key, train=False)
    np.testing.assert_allclose(other[1], out[1], atol=1e-5)

    bf16 = NCSNpp(num_classes=3, dtype=jnp.bfloat16, **TINY_NCSNPP)
    out_bf16 = jax.jit(lambda p: bf16.apply({"params": p}, x, c, y=y))(params)
    assert out_bf16.dtype == jnp.float32
    assert _rel_err(out_bf16, out) < 0.05


def test_ddpmpp_tiny_is_ncsnpp_without_fir_and_pyramid():
    assert issubclass(DDPMpp, NCSNpp)
    net = DDPMpp(**TINY_NCSNPP)
    shapes = L.abstract_params(net, 8)
    assert "GaussianFourierProjection_0" not in shapes and "FIRConv2d_0" not in shapes
    assert L.count_params(shapes) == _ncsnpp_count(
        8, (1, 2), 1, (4,), 8, fourier=False, residual_pyramid=False
    )
    x, c = _inputs(size=8)
    out = jax.jit(lambda p: net.apply({"params": p}, x, c))(_random_params(shapes))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    # score_sde's "input_skip" pyramid is supported too.
    skip = NCSNpp(progressive_input="input_skip", **TINY_NCSNPP)
    assert (
        L.count_params(L.abstract_params(skip, 8))
        == L.count_params(L.abstract_params(NCSNpp(progressive_input="none", **TINY_NCSNPP), 8))
        + 3 * 8
        + 8
    )  # one 1x1 combine conv


def test_adm_tiny_behaviour():
    net = ADMUNet(num_classes=4, use_scale_shift_norm=True, **TINY_ADM)
    shapes = L.abstract_params(net, 8)
    assert L.count_params(shapes) == _adm_count(
        size=8, use_scale_shift_norm=True, num_classes=4, **TINY_ADM
    )
    params = _random_params(shapes, seed=4)
    x, c = _inputs()
    c = 1000 * c  # the PyTorch code feeds 1000·0.25·ln t to the ADM UNet
    y = jnp.array([3, 1])
    key = _key(0)
    apply = _apply_fn(net)
    out = apply(params, x, c, y, key, train=False)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, apply(params, x, c, y, _key(3), train=False))
    assert _rel_err(apply(params, x, c, y, _key(1), train=True), out) > 1e-3
    assert _rel_err(apply(params, x, c, jnp.array([0, 1]), key, train=False), out) > 1e-3
    # Changing only example 0's label leaves example 1 untouched.
    other = apply(params, x, c, jnp.array([0, 1]), key, train=False)
    np.testing.assert_allclose(other[1], out[1], atol=1e-5)

    # Unconditional, no scale-shift, resampling layers instead of resampling ResBlocks.
    plain = ADMUNet(num_classes=None, use_scale_shift_norm=False, resblock_updown=False, **TINY_ADM)
    plain_shapes = L.abstract_params(plain, 8)
    assert "ResBlock_9" not in plain_shapes and "Conv_2" in plain_shapes  # resampling convolutions
    out = jax.eval_shape(lambda p: plain.apply({"params": p}, x, c), plain_shapes)
    assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "build,kwargs,x_shape,match",
    [
        (lambda: NCSNpp(num_classes=3, **TINY_NCSNPP), {}, (2, 8, 8, 3), "class-conditional"),
        (lambda: NCSNpp(**TINY_NCSNPP), {"y": jnp.array([0, 1])}, (2, 8, 8, 3), "unconditional"),
        (lambda: NCSNpp(**TINY_NCSNPP), {}, (2, 7, 7, 3), "not divisible"),
        (lambda: NCSNpp(**TINY_NCSNPP), {}, (2, 16, 16, 3), "never reached"),
        (lambda: NCSNpp(**TINY_NCSNPP), {}, (2, 8, 16, 3), "square"),
        (
            lambda: NCSNpp(embedding_type="learned", **TINY_NCSNPP),
            {},
            (2, 8, 8, 3),
            "embedding_type",
        ),
        (lambda: ADMUNet(num_classes=10, **TINY_ADM), {}, (2, 8, 8, 3), "class-conditional"),
        (
            lambda: ADMUNet(num_classes=None, **TINY_ADM),
            {"y": jnp.array([0, 1])},
            (2, 8, 8, 3),
            "unconditional",
        ),
        (
            lambda: ADMUNet(num_classes=10, **TINY_ADM),
            {"y": jnp.array([0.0, 1.0])},
            (2, 8, 8, 3),
            "integers",
        ),
        (lambda: ADMUNet(num_classes=None, **TINY_ADM), {}, (2, 12, 12, 3), "never reached"),
        (
            lambda: ADMUNet(num_classes=None, **{**TINY_ADM, "num_head_channels": 5}),
            {},
            (2, 8, 8, 3),
            "num_head_channels",
        ),
        (
            lambda: ADMUNet(num_classes=None, **TINY_ADM),
            {"c": jnp.zeros(3)},
            (2, 8, 8, 3),
            "c_noise",
        ),
    ],
)
def test_bad_inputs_raise_value_error(build, kwargs, x_shape, match):
    net = build()
    kwargs = dict(kwargs)
    c = kwargs.pop("c", jnp.zeros(x_shape[0]))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x_shape), c, **kwargs))


def test_registry_builds_networks():
    assert type(get_network("ncsnpp", nf=8)) is NCSNpp
    ddpm = get_network("ddpmpp")
    assert type(ddpm) is DDPMpp and ddpm.embedding_type == "positional" and not ddpm.fir
    adm = get_network("adm", **LSUN256_CONFIG)
    assert adm == ADMUNet.lsun256() and adm.num_classes is None


class _CountedNet(nn.Module):
    """A network that counts how often it is traced (each init or apply runs its body)."""

    features: int
    widths: tuple = (3,)
    num_classes: int | None = None
    traced = []

    @nn.compact
    def __call__(self, x, c_noise, y=None, train: bool = False):
        type(self).traced.append(x.shape)
        h = nn.Dense(self.features)(x.reshape(x.shape[0], -1))
        if y is not None:
            h = h + nn.Embed(10, self.features)(y)
        return nn.Dense(math.prod(x.shape[1:]))(h).reshape(x.shape)


def test_init_shapes_are_those_of_init_traced_once_per_network_and_returned_as_copies():
    """``layers.init_shapes`` (what checking a config, converting weights and writing a run ask for)
    gives the shapes ``module.init`` gives, traces a network and input shape once, hands each
    caller its own tree, and still answers for a module it cannot hash (a list field)."""
    _CountedNet.traced.clear()
    key = jax.random.key(0)
    x, c, y = jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    for labels in (False, True):
        want = jax.eval_shape(
            lambda: _CountedNet(5).init(key, x, c, y if labels else None)["params"]
        )
        got = L.init_shapes(_CountedNet(5), x.shape, labels=labels)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert "Embed_0" in got
    traced = len(_CountedNet.traced)
    again = L.init_shapes(_CountedNet(5), (1, 4, 4, 2), labels=True)  # an equal module: memoized
    assert len(_CountedNet.traced) == traced
    again.pop("Embed_0")  # the caller's copy
    assert "Embed_0" in L.init_shapes(_CountedNet(5), (1, 4, 4, 2), labels=True)
    # Another width, another input shape: traced again, other shapes.
    assert L.init_shapes(_CountedNet(6), (1, 4, 4, 2), labels=False)["Dense_0"]["bias"].shape == (
        6,
    )
    assert L.init_shapes(_CountedNet(5), (1, 2, 2, 2), labels=False)["Dense_1"]["bias"].shape == (
        8,
    )
    assert len(_CountedNet.traced) == traced + 2
    # An unhashable field: traced each time, same answer.
    listed = L.init_shapes(_CountedNet(5, widths=[3]), (1, 4, 4, 2), labels=False)
    assert listed["Dense_0"]["kernel"].shape == (32, 5)
    assert len(_CountedNet.traced) == traced + 3


def test_apply_fn_traces_an_equal_network_once_per_input_shape_and_computes_what_apply_does():
    """``make_apply_fn`` calls the network through one nested jit keyed by the module's value: two
    programs (a value and a gradient) of two equal modules trace the network once; another input
    shape, another module or ``train`` traces it again; the results are those of ``module.apply``
    traced in place (bit for bit: XLA inlines the nested call), also for a module it cannot hash."""
    from consistency_jax.networks import make_apply_fn

    x, c = jnp.linspace(-1.0, 1.0, 32).reshape(1, 4, 4, 2), jnp.full((1,), 0.3)
    params = _CountedNet(5).init(jax.random.key(0), x, c)["params"]
    other = _CountedNet(6).init(jax.random.key(0), x, c)["params"]
    _CountedNet.traced.clear()

    def value(module, p, x):
        return make_apply_fn(module)(p, x, c)

    def grad(module, p, x):
        return jax.grad(lambda p: jnp.sum(make_apply_fn(module)(p, x, c) ** 2))(p)

    def in_place(module, p, x):
        return module.apply({"params": p}, x, c)

    def in_place_grad(module, p, x):
        return jax.grad(lambda p: jnp.sum(in_place(module, p, x) ** 2))(p)

    got_value = jax.jit(lambda p, x: value(_CountedNet(5), p, x))(params, x)
    got_grad = jax.jit(lambda p, x: grad(_CountedNet(5), p, x))(params, x)
    assert len(_CountedNet.traced) == 1  # one trace for both programs and both modules
    want_value = jax.jit(lambda p, x: in_place(_CountedNet(5), p, x))(params, x)
    want_grad = jax.jit(lambda p, x: in_place_grad(_CountedNet(5), p, x))(params, x)
    np.testing.assert_array_equal(got_value, want_value)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_array_equal(g, w)
    assert float(jnp.abs(want_value).max()) > 0.1  # not a trivial network output

    _CountedNet.traced.clear()
    jax.jit(lambda p, x: value(_CountedNet(5), p, x))(params, jnp.concatenate([x, x]))
    jax.jit(lambda p, x: grad(_CountedNet(5), p, x))(params, jnp.concatenate([x, x]))
    assert len(_CountedNet.traced) == 1  # another batch size: traced once more
    jax.jit(lambda p, x: make_apply_fn(_CountedNet(5))(p, x, c, train=True))(params, x)
    assert len(_CountedNet.traced) == 2  # train=True is another program of the network
    jax.jit(lambda p, x: value(_CountedNet(6), p, x))(other, x)
    assert len(_CountedNet.traced) == 3

    # An unhashable field (a list): traced in place at every call, same answer.
    listed = _CountedNet(5, widths=[3])
    _CountedNet.traced.clear()
    for _ in range(2):
        np.testing.assert_array_equal(
            jax.jit(lambda p, x: value(listed, p, x))(params, x), want_value
        )
    assert len(_CountedNet.traced) == 2


def test_init_params_traces_an_equal_network_once_and_gives_what_init_does():
    """``networks.init_params`` (the train state's initialiser): the same θ as a jitted
    ``module.init`` with the same key, bit for bit; two programs (a shape evaluation and a jitted
    creation) of two equal modules trace the network once; labels or another shape trace it
    again."""
    from consistency_jax.networks import init_params

    key = jax.random.key(3)  # a width no other test initialises: the trace cache is per process
    x, c, y = jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    # In place inside a jit, as the train state's creation ran it (eagerly, XLA's fused
    # initialisers may round a last bit differently).
    want = jax.jit(lambda k: _CountedNet(7).init({"params": k, "dropout": k}, x, c)["params"])(key)
    want_labels = jax.jit(
        lambda k: _CountedNet(7).init({"params": k, "dropout": k}, x, c, y)["params"]
    )(key)
    _CountedNet.traced.clear()
    shapes = jax.eval_shape(lambda k: init_params(_CountedNet(7), k, (4, 4, 2)), key)
    got = jax.jit(lambda k: init_params(_CountedNet(7), k, (4, 4, 2)))(key)
    assert len(_CountedNet.traced) == 1
    assert jax.tree.structure(shapes) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
    got_labels = jax.jit(lambda k: init_params(_CountedNet(7), k, (4, 4, 2), labels=True))(key)
    assert "Embed_0" in got_labels and len(_CountedNet.traced) == 2
    for g, w in zip(jax.tree.leaves(got_labels), jax.tree.leaves(want_labels), strict=True):
        np.testing.assert_array_equal(g, w)
    init_params(_CountedNet(7), key, (2, 2, 2))
    assert len(_CountedNet.traced) == 3
    # An unhashable field: traced in place, the same θ.
    listed = jax.jit(lambda k: init_params(_CountedNet(7, widths=[3]), k, (4, 4, 2)))(key)
    for g, w in zip(jax.tree.leaves(listed), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)
