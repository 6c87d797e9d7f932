"""The second time input of flow-map networks (MeanFlow's t − r): a network built with it computes, at
initialisation, exactly what the same network without it computes (the new embedding's last layer is
zero), its other parameters keep their names and values, and after training the input matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from consistency_jax import networks
from consistency_jax.networks.second_time import PARAM_NAME

NETS = {
    "mlp": (dict(hidden=16, depth=2), (4, 2)),
    "ddpmpp": (
        dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
        (2, 8, 8, 1),
    ),
    "ncsnpp": (
        dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
        (2, 8, 8, 3),
    ),
    "adm": (
        dict(
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_classes=None,
            attention_resolutions=(4,),
            num_head_channels=4,
            dropout=0.0,
        ),
        (2, 8, 8, 3),
    ),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_second_time_starts_unchanged_and_renames_nothing(name):
    kwargs, shape = NETS[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    c = jnp.asarray(rng.uniform(-1, 1, shape[0]), jnp.float32)
    c2 = jnp.asarray(rng.uniform(0, 1, shape[0]), jnp.float32)
    plain = networks.get_network(name, **kwargs)
    flow = networks.get_network(name, second_time=True, **kwargs)
    # An rbg key: initialising with threefry keys compiles for most of a minute on CPU.
    key = jax.random.key(1, impl="rbg")
    p_plain = plain.init(key, x, c)["params"]
    p_flow = flow.init(key, x, c, c_noise_2=c2)["params"]
    assert set(p_flow) == set(p_plain) | {PARAM_NAME}
    rest = {k: v for k, v in p_flow.items() if k != PARAM_NAME}
    jax.tree.map(np.testing.assert_array_equal, rest, dict(p_plain))  # same names, same values
    f_plain = networks.make_apply_fn(plain)
    f_flow = networks.make_apply_fn(flow)
    out = f_plain(p_plain, x, c)
    np.testing.assert_array_equal(np.asarray(f_flow(p_flow, x, c, c_noise_2=c2)), np.asarray(out))
    # A plain (EDM / flow-matching) run's parameters plus a fresh second_time subtree: the same model.
    grafted = dict(p_plain, **{PARAM_NAME: p_flow[PARAM_NAME]})
    np.testing.assert_array_equal(np.asarray(f_flow(grafted, x, c, c_noise_2=c2)), np.asarray(out))
    # Once trained (every parameter moved: the zero-initialised output layers of NCSN++ / ADM too),
    # the second time changes the output.
    p_moved = jax.tree.map(
        lambda a: a + np.asarray(0.1 * rng.normal(size=a.shape), a.dtype), p_flow
    )
    a = f_flow(p_moved, x, c, c_noise_2=c2)
    b = f_flow(p_moved, x, c, c_noise_2=c2 * 0.5)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    with pytest.raises(ValueError, match="second_time=True"):
        f_flow(p_flow, x, c)
    with pytest.raises(ValueError, match="no second time input"):
        f_plain(p_plain, x, c, c_noise_2=c2)
