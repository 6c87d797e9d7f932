"""Zero-shot editing with a consistency model (CM, Song et al. 2023, §6 and Algorithm 4), and the same
tasks with an EDM teacher (diffusion-based editing) for comparison.

Algorithm 4 edits a reference image y through an orthogonal linear map A and a binary mask Ω in A's
coordinates, Ω = 1 where the output is generated and Ω = 0 where it is copied from y. After every
consistency step it projects onto the images that agree with y on the known part:

    x ← A⁻¹[(A y) ⊙ (1 − Ω) + (A x) ⊙ Ω]                                        (CM Algorithm 4)

The tasks and their (A, Ω):
  - inpainting: A = I, Ω = the pixels to fill (``inpainting_mask``: arrays or named presets);
  - colorization: A = an orthogonal 3×3 map on the channels whose first row is the unit luma direction
    (``luma_basis``), Ω = the two chroma coordinates: the luma of y is kept;
  - super-resolution: A = an orthogonal p²×p² map on every p×p patch of every channel whose first row
    is the unit vector 1/p (``patch_basis``), Ω = all coefficients but the first: the patch averages of
    y are kept;
  - stroke-guided generation (SDEdit): start from the stroke image noised to an intermediate τ_0;
  - denoising: start from the given noisy image at its σ;
  - interpolation: spherical interpolation (``slerp``) of two initial noises.

Images are NHWC. Every function is pure: randomness comes only from its ``rng`` argument, the shapes
are static, and a ``jax.jit`` of it (with the model, the task and the times fixed) traces once per
input shape. The transforms are applied at ``Precision.HIGHEST`` so that the known part survives the
round trip A⁻¹A to float rounding on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from consistency_jax import parameterization as param_lib
from consistency_jax import samplers

Array = jax.Array
MaskLike = str | np.ndarray | Array

# ITU-R BT.601 luma weights (R, G, B), the weights CM's official colorization uses (to 3 digits).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------
# The orthogonal transforms A of Algorithm 4


class Transform(NamedTuple):
    """An orthogonal linear map A on NHWC images and its inverse A⁻¹ = Aᵀ (CM Algorithm 4)."""

    forward: Callable[[Array], Array]
    inverse: Callable[[Array], Array]


def _basis_with_first_row(direction: Sequence[float]) -> np.ndarray:
    """An orthogonal n×n matrix (float64) whose first row is direction/‖direction‖.

    The Householder reflection H = I − 2vvᵀ/(vᵀv), v = w − e₁, maps the unit vector w to e₁; H is
    symmetric, so its first row is H e₁ = w. Closed form, no QR, and exactly orthogonal up to rounding.
    """
    w = np.asarray(direction, np.float64)
    w = w / np.linalg.norm(w)
    n = w.size
    v = w - np.eye(n)[0]
    if np.dot(v, v) < 1e-24:  # w is already e₁ (a 1×1 patch): nothing to rotate.
        return np.eye(n)
    return np.eye(n) - 2.0 * np.outer(v, v) / np.dot(v, v)


def luma_basis() -> np.ndarray:
    """The 3×3 orthogonal colour basis of colorization: row 0 the unit luma direction, rows 1–2 chroma."""
    return _basis_with_first_row(LUMA_WEIGHTS)


def patch_basis(patch_size: int) -> np.ndarray:
    """The p²×p² orthogonal basis of super-resolution: row 0 is 1/p (coefficient 0 = p·patch mean).

    A patch's pixels are ordered row-major (pixel (i, j) of the patch is entry i·p + j).
    """
    if int(patch_size) < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")
    return _basis_with_first_row(np.ones(int(patch_size) ** 2))


def _matrix(q: np.ndarray, x: Array) -> Array:
    return jnp.asarray(q, dtype=x.dtype)


def identity_transform() -> Transform:
    """A = I (inpainting, SDEdit)."""
    same = lambda x: x
    return Transform(same, same)


def _check_rgb(x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"Colorization needs RGB images (B, H, W, 3), got shape {tuple(x.shape)}: a "
            "grayscale (C = 1) image has no chroma to generate; give its luma replicated to "
            "3 channels instead."
        )


def colorization_transform() -> Transform:
    """A acting on the channels of an RGB image by ``luma_basis()``: (A x)[..., 0] is the unit luma."""
    q = luma_basis()

    def forward(x):
        _check_rgb(x)
        return jnp.einsum("bhwd,cd->bhwc", x, _matrix(q, x), precision=_HIGHEST)

    def inverse(x):
        _check_rgb(x)
        return jnp.einsum("bhwc,cd->bhwd", x, _matrix(q, x), precision=_HIGHEST)

    return Transform(forward, inverse)


def _check_patches(x: Array, p: int) -> None:
    if x.ndim != 4 or x.shape[1] % p or x.shape[2] % p:
        raise ValueError(
            f"Super-resolution needs NHWC images whose height and width are multiples of "
            f"patch_size={p}, got shape {tuple(x.shape)}."
        )


def _to_patches(x: Array, p: int) -> Array:
    """(B, H, W, C) -> (B, H/p, W/p, p·p, C), the pixels of a patch row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p, c)


def _from_patches(v: Array, p: int) -> Array:
    b, hp, wp, _, c = v.shape
    v = v.reshape(b, hp, wp, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return v.reshape(b, hp * p, wp * p, c)


def superres_transform(patch_size: int) -> Transform:
    """A acting on every p×p patch of every channel by ``patch_basis(p)``, written back in place.

    Coefficient k of a patch is stored at the patch's pixel (k // p, k % p): coefficient 0 (p × the
    patch mean) sits at each patch's top-left pixel, so A x keeps the NHWC shape of x.
    """
    p = int(patch_size)
    q = patch_basis(p)

    def forward(x):
        _check_patches(x, p)
        coeffs = jnp.einsum("bhwkc,jk->bhwjc", _to_patches(x, p), _matrix(q, x), precision=_HIGHEST)
        return _from_patches(coeffs, p)

    def inverse(x):
        _check_patches(x, p)
        pixels = jnp.einsum("bhwjc,jk->bhwkc", _to_patches(x, p), _matrix(q, x), precision=_HIGHEST)
        return _from_patches(pixels, p)

    return Transform(forward, inverse)


# ----------------------------------------------------------------------------------------------------
# Masks Ω (True where the output is generated, False where it is copied from y)


INPAINTING_PRESETS = (
    "center_box",
    "left_half",
    "right_half",
    "top_half",
    "bottom_half",
    "random_strokes",
)


def _strokes(height: int, width: int, seed: int, num_strokes: int = 4) -> np.ndarray:
    """Thick random-walk strokes (a free-form mask), a deterministic function of the seed."""
    rng = np.random.default_rng(seed)
    size = min(height, width)
    radius = max(1.0, size / 10)
    rows, cols = np.mgrid[:height, :width]
    mask = np.zeros((height, width), bool)
    for _ in range(num_strokes):
        point = rng.uniform([0, 0], [height, width])
        for _ in range(int(rng.integers(3, 7))):
            angle = rng.uniform(0, 2 * np.pi)
            end = point + rng.uniform(0.2, 0.5) * size * np.array([np.sin(angle), np.cos(angle)])
            end = np.clip(end, 0, [height - 1, width - 1])
            for s in np.linspace(0.0, 1.0, 4 * size):
                centre = point + s * (end - point)
                mask |= (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
            point = end
    return mask


def inpainting_mask(name: str, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """A named inpainting mask Ω of shape (H, W), True on the pixels to generate.

    Presets: "center_box" (the central box of half the height and width), "left_half", "right_half",
    "top_half", "bottom_half" (that half is generated), "random_strokes" (four thick random-walk brush
    strokes, a deterministic function of ``seed``).
    """
    mask = np.zeros((height, width), bool)
    if name == "center_box":
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    elif name == "left_half":
        mask[:, : width // 2] = True
    elif name == "right_half":
        mask[:, width // 2 :] = True
    elif name == "top_half":
        mask[: height // 2] = True
    elif name == "bottom_half":
        mask[height // 2 :] = True
    elif name == "random_strokes":
        mask = _strokes(height, width, seed)
    else:
        raise ValueError(
            f"Unknown inpainting mask {name!r}; choose one of {INPAINTING_PRESETS} or pass "
            "an array."
        )
    return mask


def colorization_mask() -> np.ndarray:
    """Ω of colorization, shape (1, 1, 1, 3): coordinate 0 (luma) known, the two chroma generated."""
    return np.array([False, True, True]).reshape(1, 1, 1, 3)


def superres_mask(height: int, width: int, patch_size: int) -> np.ndarray:
    """Ω of super-resolution, shape (1, H, W, 1): coefficient 0 of every patch (its top-left pixel in
    ``superres_transform``'s layout) known, every other coefficient generated."""
    p = int(patch_size)
    rows, cols = np.mgrid[:height, :width]
    return ((rows % p != 0) | (cols % p != 0)).reshape(1, height, width, 1)


def as_mask(mask: MaskLike, shape: Sequence[int], *, seed: int = 0) -> Array:
    """Ω as a boolean array of rank 4 that broadcasts to the image ``shape`` (B, H, W, C).

    Accepts a preset name (``inpainting_mask``), or an array of shape (H, W), (H, W, C) or
    (B, H, W, C) in which any axis may be 1 (broadcast); non-zero entries are generated.
    """
    shape = tuple(shape)
    if isinstance(mask, str):
        mask = inpainting_mask(mask, shape[1], shape[2], seed=seed)
    m = jnp.asarray(mask)
    if m.ndim == 2:
        m = m[None, :, :, None]
    elif m.ndim == 3:
        m = m[None]
    if m.ndim != 4 or any(a not in (1, b) for a, b in zip(m.shape, shape)):
        raise ValueError(
            f"The mask's shape {tuple(jnp.shape(mask))} does not match images of shape "
            f"{shape}: give (H, W), (H, W, C) or (B, H, W, C), any axis 1 to broadcast."
        )
    return m if m.dtype == jnp.bool_ else m != 0


def project(transform: Transform, omega: Array, x: Array, y: Array) -> Array:
    """x ← A⁻¹[(A y) ⊙ (1 − Ω) + (A x) ⊙ Ω] (CM Algorithm 4): y's known part, x's generated part."""
    return transform.inverse(jnp.where(omega, transform.forward(x), transform.forward(y)))


# ----------------------------------------------------------------------------------------------------
# Spherical interpolation


def slerp(z0: Array, z1: Array, alpha: float | Array) -> Array:
    """Spherical linear interpolation of two batches of noises, per example (B, ...).

    slerp = sin((1 − α)θ)/sin θ · z0 + sin(αθ)/sin θ · z1 with cos θ = ⟨z0, z1⟩/(‖z0‖‖z1‖), the
    interpolation of CM's Figure 6 (as in DDIM); linear where the two are (anti)parallel to rounding.
    ``alpha`` is a scalar or (B,). α = 0 gives z0 and α = 1 gives z1 exactly.
    """
    z0, z1 = param_lib.as_compute_dtype(z0), param_lib.as_compute_dtype(z1)
    axes = tuple(range(1, z0.ndim))
    expand = lambda v: jnp.reshape(v, v.shape + (1,) * len(axes))
    cos = jnp.sum(z0 * z1, axis=axes) / jnp.sqrt(
        jnp.sum(z0 * z0, axis=axes) * jnp.sum(z1 * z1, axis=axes)
    )
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    alpha = jnp.broadcast_to(jnp.asarray(alpha, z0.dtype), theta.shape)
    sin = jnp.sin(theta)
    tiny = sin < 1e-6
    safe = jnp.where(tiny, 1.0, sin)
    w0 = jnp.where(tiny, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / safe)
    w1 = jnp.where(tiny, alpha, jnp.sin(alpha * theta) / safe)
    return expand(w0) * z0 + expand(w1) * z1


# ----------------------------------------------------------------------------------------------------
# Editing with a consistency model (CM Algorithm 4)


def _prepare(
    y: Array, transform: Transform, mask: MaskLike
) -> tuple[Array, Array, Array, Callable]:
    """y in the compute dtype, Ω, A y, and the projection x ↦ A⁻¹[(A y)(1 − Ω) + (A x)Ω]."""
    y = param_lib.as_compute_dtype(y)
    if y.ndim != 4:
        raise ValueError(f"Editing works on NHWC image batches, got shape {tuple(y.shape)}.")
    omega = as_mask(mask, y.shape)
    return y, omega, transform.forward(y), lambda x: project(transform, omega, x, y)


def _start(transform: Transform, omega: Array, y: Array, ay: Array, start_from: str) -> Array:
    """The mean of the start: ỹ = A⁻¹[(A y) ⊙ (1 − Ω)] (Algorithm 4's first line: y with its generated
    part set to 0), or y itself (SDEdit)."""
    if start_from == "known":
        return transform.inverse(jnp.where(omega, jnp.zeros_like(ay), ay))
    if start_from == "y":
        return y
    raise ValueError(f"start_from must be 'known' or 'y', got {start_from!r}.")


def _consistency_loop(
    apply_fn, params, rng, x_init, ts, sigmas, *, labels, clip, consistency_fn, proj, return_steps
):
    """Algorithm 1 from ``x_init`` with ``proj`` after every step; optionally every projected x0."""
    steps = []

    def record(x):
        # multistep_sample is a Python loop traced inside this function: each x is this trace's value.
        x = x if proj is None else proj(x)
        steps.append(x)
        return x

    x = samplers.multistep_sample(
        apply_fn,
        params,
        rng,
        x_init.shape,
        ts,
        sigmas,
        labels=labels,
        clip=clip,
        x_init=x_init,
        consistency_fn=consistency_fn,
        project=record,
    )
    return (x, jnp.stack(steps)) if return_steps else x


def edit(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    y: Array,
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    transform: Transform,
    mask: MaskLike,
    labels: Array | None = None,
    clip: float | None = None,
    consistency_fn=param_lib.consistency_fn,
    start_from: str = "known",
    return_steps: bool = False,
):
    """Zero-shot editing of y with a consistency model, any orthogonal A (CM Algorithm 4).

    With ts = (τ_0 > τ_1 > …) and ỹ = A⁻¹[(A y) ⊙ (1 − Ω)] (y with its generated part zeroed):

        x ← ỹ + τ_0·z;  x ← f(x, τ_0);  x ← A⁻¹[(A y)(1 − Ω) + (A x)Ω]
        for τ in τ_1, …:  x ← x + √(τ² − ε²)·z;  x ← f(x, τ);  x ← A⁻¹[(A y)(1 − Ω) + (A x)Ω]

    The start follows Algorithm 4 (x ~ N(ỹ, τ_0²I)); CM's official code starts from τ_0·z, which for
    τ_0 = T = 80 differs from it by ỹ, under 2 % of the noise's standard deviation. A trailing ε in
    ``ts`` is dropped (f(·, ε) is the identity and the projection is idempotent).

    Args:
      apply_fn, params: the raw network and its parameters (``consistency_fn``'s first arguments).
      rng: key; split into the start noise and the keys of ``samplers.multistep_sample``.
      y: the reference images (B, H, W, C); only their known part (Ω = 0) is used.
      ts: strictly decreasing times in [ε, T], usually starting at T.
      sigmas: the noise configuration.
      transform: A and A⁻¹ (``identity_transform``, ``colorization_transform``, ``superres_transform``).
      mask: Ω in A's coordinates, True where generated (see ``as_mask``).
      labels: class labels (B,) for a conditional model.
      clip: if set, clamp each x0 estimate to [−clip, clip] before the projection (cm: 1.0).
      consistency_fn: f(apply_fn, params, x, t, sigmas, **kw); ``trigflow.consistency_fn_sigma`` for sCM.
      start_from: "known" (Algorithm 4: x ← ỹ + τ_0·z) or "y" (SDEdit: x ← y + τ_0·z, the whole of y).
      return_steps: also return every projected x0 estimate, shape (K, B, H, W, C) for K times (a
        trailing ε not counted).

    Returns:
      The edited images (B, H, W, C), and the steps if ``return_steps``.
    """
    ts = samplers.check_times(ts, sigmas)
    y, omega, ay, proj = _prepare(y, transform, mask)
    k_init, k_loop = jax.random.split(rng)
    x_init = _start(transform, omega, y, ay, start_from) + ts[0] * jax.random.normal(
        k_init, y.shape, y.dtype
    )
    return _consistency_loop(
        apply_fn,
        params,
        k_loop,
        x_init,
        ts,
        sigmas,
        labels=labels,
        clip=clip,
        consistency_fn=consistency_fn,
        proj=proj,
        return_steps=return_steps,
    )


def inpaint(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    y: Array,
    mask: MaskLike,
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
):
    """Inpainting (Algorithm 4 with A = I): the pixels where ``mask`` is True are generated, the others
    are y's exactly. ``mask`` is an array (see ``as_mask``) or a preset name (``inpainting_mask``).
    Keyword arguments as in ``edit``."""
    return edit(
        apply_fn, params, rng, y, ts, sigmas, transform=identity_transform(), mask=mask, **kwargs
    )


def colorize(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    y: Array,
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    **kwargs: Any,
):
    """Colorization (Algorithm 4 with A = ``colorization_transform()``): the output's luma is y's, its
    chroma generated. y is RGB (B, H, W, 3): a colour image or a gray one replicated to 3 channels (the
    luma weights sum to 1, so gray g has luma g). A 1-channel y is refused. Keyword arguments as in
    ``edit``."""
    _check_rgb(jnp.asarray(y))
    return edit(
        apply_fn,
        params,
        rng,
        y,
        ts,
        sigmas,
        transform=colorization_transform(),
        mask=colorization_mask(),
        **kwargs,
    )


def patch_average(x: Array, patch_size: int) -> Array:
    """The mean of every p×p patch: (B, H, W, C) -> (B, H/p, W/p, C) (the low-resolution image)."""
    p = int(patch_size)
    _check_patches(x, p)
    return jnp.mean(_to_patches(jnp.asarray(x), p), axis=3)


def upsample_nearest(x: Array, patch_size: int) -> Array:
    """Each pixel repeated over a p×p patch: (B, h, w, C) -> (B, h·p, w·p, C)."""
    p = int(patch_size)
    return jnp.repeat(jnp.repeat(jnp.asarray(x), p, axis=1), p, axis=2)


def super_resolve(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    y_low: Array,
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    patch_size: int,
    **kwargs: Any,
):
    """Super-resolution (Algorithm 4 with A = ``superres_transform(p)``) of a low-resolution image.

    ``y_low`` (B, h, w, C) becomes (B, h·p, w·p, C) whose p×p patch means equal ``y_low`` (to float
    rounding); everything else in the patches is generated. Downsample a full-resolution image with
    ``patch_average`` first. Keyword arguments as in ``edit``.
    """
    y = upsample_nearest(y_low, patch_size)
    return edit(
        apply_fn,
        params,
        rng,
        y,
        ts,
        sigmas,
        transform=superres_transform(patch_size),
        mask=superres_mask(y.shape[1], y.shape[2], patch_size),
        **kwargs,
    )


def sdedit(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array,
    y: Array,
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    mask: MaskLike | None = None,
    **kwargs: Any,
):
    """Stroke-guided generation (SDEdit; CM §6): x ← f(y + τ_0·z, τ_0), then Algorithm 1 over ts[1:].

    Unlike inpainting, the whole stroke image y is noised (not zeroed first): ts[0] = τ_0 < T sets how
    much of it survives (smaller keeps more). No constraint by default (Ω = 1 everywhere, the
    projection is the identity); with ``mask`` (True where regenerated) the pixels outside it are y's
    after every step, as in ``inpaint``. Keyword arguments as in ``edit``.
    """
    mask = np.ones((1, 1, 1, 1), bool) if mask is None else mask
    return edit(
        apply_fn,
        params,
        rng,
        y,
        ts,
        sigmas,
        transform=identity_transform(),
        mask=mask,
        start_from="y",
        **kwargs,
    )


def denoise(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array | None,
    y: Array,
    sigma: float,
    sigmas: param_lib.SigmaConfig,
    *,
    ts: Sequence[float] = (),
    labels: Array | None = None,
    clip: float | None = None,
    consistency_fn=param_lib.consistency_fn,
    return_steps: bool = False,
):
    """Denoising of y = x + σ·z (CM §6): x ← f(y, σ), one network evaluation, no known part.

    σ is a Python float (static under jit), the same for the whole batch.
    ``ts`` (each < σ) adds Algorithm-1 steps after it, which need ``rng``; with none, ``rng`` may be None.
    """
    ts = samplers.check_times((sigma, *ts), sigmas)
    rng = _rng_or_unused(rng, ts, sigmas, "denoise")
    y = param_lib.as_compute_dtype(y)
    return _consistency_loop(
        apply_fn,
        params,
        rng,
        y,
        ts,
        sigmas,
        labels=labels,
        clip=clip,
        consistency_fn=consistency_fn,
        proj=None,
        return_steps=return_steps,
    )


def _rng_or_unused(
    rng: Array | None, ts: tuple[float, ...], sigmas: param_lib.SigmaConfig, what: str
) -> Array:
    """``rng``, or a placeholder key where one step (or a trailing ε) draws no noise."""
    if rng is not None:
        return rng
    if len(ts) > 1 and ts[1] > sigmas.sigma_min:
        raise ValueError(
            f"{what} with more than one time needs an rng for the noise of the later steps."
        )
    return jax.random.key(0)  # never drawn from


def _slerp_batch(z0: Array, z1: Array, alphas: Array) -> Array:
    """slerp at every α: (K,) × (B, ...) -> (K·B, ...), α-major."""
    z = jax.vmap(lambda a: slerp(z0, z1, a))(jnp.asarray(alphas))
    return z.reshape((-1,) + z.shape[2:])


def _tile_labels(labels: Array | None, k: int) -> Array | None:
    return None if labels is None else jnp.tile(jnp.asarray(labels), k)


def interpolate(
    apply_fn: param_lib.ApplyFn,
    params: Any,
    rng: Array | None,
    z0: Array,
    z1: Array,
    alphas: Sequence[float],
    ts: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    *,
    labels: Array | None = None,
    clip: float | None = None,
    consistency_fn=param_lib.consistency_fn,
) -> Array:
    """Interpolation between two noises (CM §6, Figure 6): x_α = sample from ts[0]·slerp(z0, z1, α).

    z0, z1 are unit-variance noises (B, H, W, C); the result is (K, B, H, W, C) for K ``alphas``. With
    one time (one-step generation) nothing is drawn and ``rng`` may be None. No known part.
    """
    ts = samplers.check_times(ts, sigmas)
    alphas = jnp.asarray(alphas)
    x_init = ts[0] * _slerp_batch(z0, z1, alphas)
    rng = _rng_or_unused(rng, ts, sigmas, "interpolate")
    x = _consistency_loop(
        apply_fn,
        params,
        rng,
        x_init,
        ts,
        sigmas,
        labels=_tile_labels(labels, alphas.shape[0]),
        clip=clip,
        consistency_fn=consistency_fn,
        proj=None,
        return_steps=False,
    )
    return x.reshape((alphas.shape[0],) + tuple(jnp.shape(z0)))


# ----------------------------------------------------------------------------------------------------
# The same tasks with an EDM teacher (diffusion-based editing, for comparison)


def edm_edit(
    denoise: Callable[[Array, Array], Array],
    rng: Array,
    y: Array,
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
    *,
    transform: Transform,
    mask: MaskLike,
    t_max: float | None = None,
    start_from: str = "known",
    noise_known: bool = True,
) -> Array:
    """Zero-shot editing with an EDM denoiser D(x, t): EDM's Heun sampler with a projection after
    every step (diffusion-based editing in the manner of CM Algorithm 4).

    The PF-ODE runs from t_max (default T) on the Karras grid down to 0 (``samplers.edm_heun_sample``).
    One noise z is drawn; the start is x = ỹ + t_max·z as in ``edit``, and after every step, at its end
    time t, the known part is reset to that of y + t·z:

        x ← A⁻¹[A(y + t·z) ⊙ (1 − Ω) + (A x) ⊙ Ω]

    With one fixed z the known part moves along the straight line y + t·z, the PF-ODE trajectory of a
    point mass at y, so every intermediate x is a consistently noised image (fresh noise every step
    would make the known part jump between trajectories); at t = 0 it is y's exactly. With
    ``noise_known=False`` the known part is y itself at every t (plain replacement, for comparison).

    Args:
      denoise: the teacher D(x, t) with t of shape (B,) (``parameterization.network_teacher`` with
        its parameters bound, or an exact denoiser).
      rng: key of the noise z.
      y, transform, mask: as in ``edit``.
      sigmas, num_steps: the Karras grid (2·num_steps − 1 denoiser evaluations).
      t_max: the start time (SDEdit), T by default.
      start_from: "known" (ỹ + t_max·z) or "y" (y + t_max·z, SDEdit), as in ``edit``.
      noise_known: False resets the known part to y itself rather than y + t·z.

    Returns:
      The edited images (B, H, W, C).
    """
    y, omega, ay, _ = _prepare(y, transform, mask)
    t_start = sigmas.sigma_max if t_max is None else float(t_max)
    z = jax.random.normal(rng, y.shape, y.dtype)
    az = transform.forward(z) if noise_known else jnp.zeros_like(ay)

    def proj(x, t):
        known = ay + t.astype(ay.dtype) * az
        return transform.inverse(jnp.where(omega, transform.forward(x), known))

    x_init = _start(transform, omega, y, ay, start_from) + t_start * z
    return samplers.edm_heun_sample(
        denoise, rng, y.shape, sigmas, num_steps, x_init=x_init, t_max=t_max, project=proj
    )


def edm_inpaint(
    denoise,
    rng: Array,
    y: Array,
    mask: MaskLike,
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
    **kwargs: Any,
) -> Array:
    """``inpaint`` with an EDM teacher (``edm_edit`` with A = I)."""
    return edm_edit(
        denoise, rng, y, sigmas, num_steps, transform=identity_transform(), mask=mask, **kwargs
    )


def edm_colorize(
    denoise, rng: Array, y: Array, sigmas: param_lib.SigmaConfig, num_steps: int = 18, **kwargs: Any
) -> Array:
    """``colorize`` with an EDM teacher (``edm_edit`` with the luma basis)."""
    _check_rgb(jnp.asarray(y))
    return edm_edit(
        denoise,
        rng,
        y,
        sigmas,
        num_steps,
        transform=colorization_transform(),
        mask=colorization_mask(),
        **kwargs,
    )


def edm_super_resolve(
    denoise,
    rng: Array,
    y_low: Array,
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
    *,
    patch_size: int,
    **kwargs: Any,
) -> Array:
    """``super_resolve`` with an EDM teacher (``edm_edit`` with the patch basis)."""
    y = upsample_nearest(y_low, patch_size)
    return edm_edit(
        denoise,
        rng,
        y,
        sigmas,
        num_steps,
        transform=superres_transform(patch_size),
        mask=superres_mask(y.shape[1], y.shape[2], patch_size),
        **kwargs,
    )


def edm_sdedit(
    denoise,
    rng: Array,
    y: Array,
    t_start: float,
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
    *,
    mask: MaskLike | None = None,
) -> Array:
    """``sdedit`` with an EDM teacher: the PF-ODE from y + t_start·z (SDEdit with the deterministic
    sampler); with ``mask``, the pixels outside it follow y + t·z as in ``edm_edit``."""
    mask = np.ones((1, 1, 1, 1), bool) if mask is None else mask
    return edm_edit(
        denoise,
        rng,
        y,
        sigmas,
        num_steps,
        transform=identity_transform(),
        mask=mask,
        t_max=t_start,
        start_from="y",
    )


def edm_denoise(
    denoise, y: Array, sigma: float, sigmas: param_lib.SigmaConfig, num_steps: int = 18
) -> Array:
    """``denoise`` with an EDM teacher: the deterministic PF-ODE from (y, σ) to t = 0 (Heun)."""
    y = param_lib.as_compute_dtype(y)
    return samplers.edm_heun_sample(
        denoise, jax.random.key(0), y.shape, sigmas, num_steps, x_init=y, t_max=sigma
    )


def edm_interpolate(
    denoise,
    z0: Array,
    z1: Array,
    alphas: Sequence[float],
    sigmas: param_lib.SigmaConfig,
    num_steps: int = 18,
) -> Array:
    """``interpolate`` with an EDM teacher: the PF-ODE from T·slerp(z0, z1, α), (K, B, H, W, C)."""
    alphas = jnp.asarray(alphas)
    x_init = sigmas.sigma_max * _slerp_batch(z0, z1, alphas)
    x = samplers.edm_heun_sample(
        denoise, jax.random.key(0), x_init.shape, sigmas, num_steps, x_init=x_init
    )
    return x.reshape((alphas.shape[0],) + tuple(jnp.shape(z0)))
