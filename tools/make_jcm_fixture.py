"""Builds tests/fixtures/jcm_ncsnpp.{msgpack,npz}: a checkpoint shaped like the released JAX CIFAR-10
consistency models (openai/consistency_models_cifar10, "jcm") and the official network's outputs, for
tests/test_convert.py (which needs none of jcm's code).

The network is jcm's own ``models/ncsnpp.py`` NCSN++ with the options of its CIFAR-10 configs
(``configs/cifar10_ve_cd.py``: BigGAN residual blocks, FIR [1, 3, 3, 1] resampling, skip rescaling,
attention, Fourier embedding of scale 16, the "residual" input pyramid, init_scale 0) at a tiny
width: 16×16 images, nf 8, ch_mult (1, 1, 2), one residual block per level, attention at 8 pixels
(an inner level, as CIFAR-10's 16 of 32). Its parameters are random (seeded) and non-zero
everywhere, including the layers jcm zero-initialises.

The checkpoint is what jcm's ``checkpoints.save_checkpoint`` writes: ``flax.serialization.to_bytes``
of a ``models.utils.State`` (step, lr, ema_rate, params, params_ema, model_state, opt_state,
rng_state). ``params`` and ``params_ema`` differ (two random draws), so a test can tell which one
the converter took; the outputs are those of ``params_ema``, the tree jcm's evaluation and its CD
teacher use. To keep the fixture small, opt_state is that of optax.sgd (stateless) rather than
RAdam's moments; the converter never reads it.

The ``.npz`` holds z (NHWC), σ, the network input c_in(σ)·σ·z, the time input c_noise = 0.25·ln σ,
the raw network output F (all float32), and jcm's own consistency function
(``get_distiller_fn``: f = c_skip·x + c_out·F with ε = t_min = 0.002) and EDM denoiser
(``get_denoiser_fn``) at x = σ·z, computed by jcm. The first two examples sit at σ = T = 80.

Regenerate (jcm's code is read from the checkout and imported from a temporary copy; its unused
``haiku`` and ``blobfile`` imports are stubbed):

    git clone https://github.com/openai/consistency_models_cifar10 /tmp/jcm-official
    python tools/make_jcm_fixture.py /tmp/jcm-official
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import types

import numpy as np

SEED = 0
SIGMAS = (80.0, 80.0, 2.0, 0.02)
FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"
)
NAME = "jcm_ncsnpp"
# The tiny architecture, as jcm config overrides (the rest is configs/cifar10_ve_cd.py's).
ARCH = dict(nf=8, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
IMAGE_SIZE = 16


def import_official(checkout: str, tmp: str):
    """jcm's package and configs copied into ``tmp`` and imported from there."""
    for sub in ("jcm", "configs"):
        shutil.copytree(os.path.join(checkout, sub), os.path.join(tmp, sub))
    for name in ("haiku", "blobfile"):  # imported at module level by jcm, unused here
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.path.insert(0, tmp)
    config = importlib.import_module("configs.cifar10_ve_cd").get_config()
    ncsnpp = importlib.import_module("jcm.models.ncsnpp")
    mutils = importlib.import_module("jcm.models.utils")
    sde_lib = importlib.import_module("jcm.sde_lib")
    return config, ncsnpp, mutils, sde_lib


def randomize(params, rng: np.random.Generator):
    """Random float32 values for every leaf, non-zero, scaled like a trained network's."""
    import jax

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if (
            name.endswith("['W']") and len(shape) == 1
        ):  # Fourier frequencies: N(0, 16²) as initialised
            value = 16.0 * rng.standard_normal(shape)
        elif name.endswith("['scale']"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # biases
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        value = value.astype(np.float32)
        value[value == 0] = 1e-3
        return value

    return jax.tree_util.tree_map_with_path(draw, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkout", help="a checkout of github.com/openai/consistency_models_cifar10"
    )
    parser.add_argument("--out", default=FIXTURES, help="fixture directory")
    args = parser.parse_args()
    import flax
    import jax
    import jax.numpy as jnp
    import optax

    with tempfile.TemporaryDirectory() as tmp:
        config, ncsnpp, mutils, sde_lib = import_official(os.path.abspath(args.checkout), tmp)
        config.model.update(ARCH)
        config.data.image_size = IMAGE_SIZE
        model = ncsnpp.NCSNpp(config=config)
        variables = model.init(
            {"params": jax.random.key(SEED), "dropout": jax.random.key(1)},
            jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)),
            jnp.ones((1,)),
            train=False,
        )
        model_state, params = flax.core.pop(variables, "params")
        rng = np.random.default_rng(SEED)
        params = flax.core.unfreeze(params)
        params_ema = randomize(params, rng)
        params = randomize(params, rng)
        state = mutils.State(
            step=800_000,
            lr=4e-4,
            ema_rate=0.9999,
            params=params,
            params_ema=params_ema,
            model_state=flax.core.unfreeze(model_state),
            opt_state=optax.sgd(1.0).init(params),
            rng_state=np.asarray(jax.random.key_data(jax.random.key(SEED))),
        )

        sde = sde_lib.KVESDE(
            t_min=config.model.t_min,
            t_max=config.model.t_max,
            N=config.model.num_scales,
            rho=config.model.rho,
            data_std=config.model.data_std,
        )
        sigma = np.asarray(SIGMAS, np.float32)
        z = rng.standard_normal((len(SIGMAS), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        x = sigma[:, None, None, None] * z
        c_in = 1.0 / np.sqrt(sigma**2 + sde.data_std**2)
        x_in = (c_in[:, None, None, None] * x).astype(np.float32)
        c_noise = (0.25 * np.log(sigma)).astype(np.float32)
        out = model.apply({"params": params_ema, **model_state}, x_in, c_noise, train=False)
        distiller = mutils.get_distiller_fn(sde, model, params_ema, model_state, train=False)
        denoiser = mutils.get_denoiser_fn(sde, model, params_ema, model_state, train=False)
        arrays = dict(
            z=z,
            sigma=sigma,
            x_in=x_in,
            c_noise=c_noise,
            out=np.asarray(out),
            f=np.asarray(distiller(jnp.asarray(x), jnp.asarray(sigma))),
            denoised=np.asarray(denoiser(jnp.asarray(x), jnp.asarray(sigma))),
        )
        data = flax.serialization.to_bytes(state)
    path = os.path.join(args.out, NAME)
    with open(path + ".msgpack", "wb") as f:
        f.write(data)
    np.savez(path + ".npz", **arrays)
    n = sum(v.size for v in jax.tree.leaves(params))
    print(
        f"{path}.msgpack: {len(data)} bytes, {len(jax.tree.leaves(params))} tensors, {n} "
        f"parameters per tree; output std {arrays['out'].std():.3f}"
    )


if __name__ == "__main__":
    main()
