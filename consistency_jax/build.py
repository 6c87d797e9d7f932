"""Building a run from a validated config: data, network, teacher, distance, method, optimizer and the
train state, created directly with its shardings on the mesh.

Nothing here validates: ``config.validate`` has checked every field before these are called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from consistency_jax import losses as losses_lib
from consistency_jax import methods as methods_lib
from consistency_jax import networks, toy
from consistency_jax import sharding as sharding_lib
from consistency_jax.toy import TOY_DATASETS
from consistency_jax.train_state import TrainState
from consistency_jax.trees import leaf_shapes

PyTree = Any


def make_optimizer(
    config: ml_collections.ConfigDict, clip_layout: bool | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax Adam/RAdam with linear warm-up, constant or cosine decay, and global-norm clipping.

    Args:
      config: the run config (``config.optim``, ``config.train.num_steps``).
      clip_layout: the layout of the optimizer state: True, ``chain(clip, optimizer)`` (a leading
        empty clip state); False, the optimizer's state alone. None: True iff
        ``config.optim.grad_clip > 0`` (what a new run uses). A resumed run passes the layout of its
        checkpoint's config, so that ``optim.grad_clip`` may be switched on or off on resume: the
        clip itself holds no state, only the layout differs.
    """
    o = config.optim
    steps = config.train.num_steps
    if o.decay == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.lr, max(o.warmup_steps, 1), max(steps, o.warmup_steps + 1), o.lr * 0.01
        )
    elif o.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
            [o.warmup_steps],
        )
    else:
        schedule = optax.constant_schedule(o.lr)
    opt = {"adam": optax.adam, "radam": optax.radam}[o.name](schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity()
    if clip_layout is None:
        clip_layout = o.grad_clip > 0
    if clip_layout:
        return optax.chain(clip, opt), schedule
    if o.grad_clip <= 0:
        return opt, schedule

    def update(grads, state, params=None):  # clip_by_global_norm is stateless: no state of its own
        grads, _ = clip.update(grads, clip.init(grads), params)
        return opt.update(grads, state, params)

    return optax.GradientTransformation(opt.init, update), schedule


def build_data(config: ml_collections.ConfigDict, start_step: int = 0):
    """Returns (iterator of this host's share of each batch, example shape)."""
    if config.data.name in TOY_DATASETS:
        it = toy.ToyIterator(
            toy.ring_mixture(),
            config.data.batch_size // jax.process_count(),
            config.seed,
            process_index=jax.process_index(),
            start_step=start_step,
        )
        return it, (2,)
    from consistency_jax import data as data_lib  # image pipeline (tfds); imported only when needed

    return data_lib.iterator_from_config(config, start_step=start_step)


def build_network(
    config: ml_collections.ConfigDict, example_shape: tuple[int, ...]
) -> tuple[Any, Callable, Callable]:
    """The configured network: (module, apply_fn, init(rng) -> θ in float32)."""
    module = networks.from_config(config.model)
    x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.data.use_labels else None

    def init(rng):
        return module.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,)), labels)["params"]

    return module, networks.make_apply_fn(module), init


def fsdp_shardings(mesh, min_size: int) -> Callable[[PyTree], PyTree]:
    """abstract tree -> its shardings on ``mesh`` (replicated over data, split over fsdp)."""
    return lambda tree: sharding_lib.state_shardings(tree, mesh, min_size=min_size)


def build_teacher(
    config: ml_collections.ConfigDict, spec: methods_lib.MethodSpec, mesh
) -> tuple[Callable | None, PyTree | None]:
    """(teacher denoiser, φ placed on the mesh) for a method that needs one, else (None, None)."""
    if not spec.needs_teacher:
        return None, None
    shardings = fsdp_shardings(mesh, config.mesh.fsdp_min_size)
    if config.teacher.workdir == "exact":
        params = toy.ring_mixture().as_params()
        return toy.exact_denoiser, sharding_lib.place(params, shardings(params))
    from consistency_jax import loading

    # The teacher's slowest (or chosen) EMA, read-only, restored straight into its shardings; never
    # saved into this run's checkpoints.
    return loading.load_teacher(
        config.teacher.workdir, ema_rate=config.teacher.ema_rate or None, sharding=shardings
    )


def build_distance(
    config: ml_collections.ConfigDict, spec: methods_lib.MethodSpec, example_shape
) -> Callable | None:
    """The distance of ``config.loss.distance`` (LPIPS with its weights), or None when the method
    does not use one."""
    if not spec.uses_distance:
        return None
    lpips_fn = None
    if config.loss.distance == "lpips":
        if not config.loss.lpips_weights:
            losses_lib.make_distance("lpips", example_shape)  # raises the explanatory error
        from consistency_jax.metrics import lpips as lpips_lib

        params = lpips_lib.load_lpips_params(config.loss.lpips_weights, net=config.loss.lpips_net)
        lpips_fn = lpips_lib.make_lpips_distance(params, net=config.loss.lpips_net)
    return losses_lib.make_distance(
        config.loss.distance, example_shape, huber_c=config.loss.huber_c, lpips_fn=lpips_fn
    )


def build_method(
    config, spec: methods_lib.MethodSpec, apply_fn, sigmas, example_shape, distance, teacher
) -> methods_lib.Method:
    """The method object of the run (its plug-in's ``build``)."""
    return spec.build(
        methods_lib.BuildContext(
            config=config,
            apply_fn=apply_fn,
            sigmas=sigmas,
            example_shape=tuple(example_shape),
            distance=distance,
            teacher=teacher,
        )
    )


def init_adds_logvar_head(
    source: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> bool:
    """This run has sCM's weighting head and the ``config.init`` source run has none: the head starts
    fresh, the source's θ initialises the network beside it."""
    return bool(config.model.get("logvar_head", False)) and not source.model.get(
        "logvar_head", False
    )


def load_init_params(
    config: ml_collections.ConfigDict, init_params: Callable[[jax.Array], PyTree], mesh
) -> PyTree:
    """θ from ``config.init.workdir``'s eval EMA (``config.init.ema_rate``; 0: its slowest), restored
    straight into the shardings θ has in the train state and in the tree structure of this run's
    ``init_params`` (``config.validate`` has checked that the network is the same).

    Raises:
      CheckpointError: the source holds no readable checkpoint (any more).
      ValueError: its parameters do not have the shapes and dtypes of this run's network.
    """
    from consistency_jax import loading

    workdir = config.init.workdir
    shardings = fsdp_shardings(mesh, config.mesh.fsdp_min_size)
    abstract = whole = jax.eval_shape(init_params, jax.random.key(0))
    source, params, step = loading.load_eval_params(
        workdir, ema_rate=config.init.ema_rate or None, sharding=shardings
    )
    fresh_head = init_adds_logvar_head(source, config)
    if fresh_head:  # sCM's weighting head starts fresh (w_φ ≡ 0); the source's θ is its "net"
        abstract = whole["net"]
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    if leaf_shapes(params, dtypes=True) != leaf_shapes(abstract, dtypes=True):
        raise ValueError(
            f"config.init.workdir={workdir!r} (step {step}): its parameters do not fit "
            "this run's network."
        )
    logging.info(
        "config.init: θ, θ⁻ (if kept) and the eval EMAs start from the %s EMA of %s (step %d).",
        config.init.ema_rate or "slowest",
        workdir,
        step,
    )
    # Orbax returns plain dicts: this run's treedef makes the state's structure the usual one.
    params = jax.tree.unflatten(jax.tree.structure(abstract), [leaf for _, leaf in got])
    if fresh_head:
        fresh = jax.jit(init_params, out_shardings=shardings(whole))(jax.random.key(config.seed))
        params = jax.tree.unflatten(
            jax.tree.structure(whole), jax.tree.leaves({**fresh, "net": params})
        )
        logging.info(
            "config.init: the weighting head w_φ starts fresh beside the source's network."
        )
    return params


def init_state(
    init_params: Callable[[jax.Array], PyTree],
    tx: optax.GradientTransformation,
    method: methods_lib.Method,
    ema_rates,
    rng: jax.Array,
    mesh,
    *,
    min_size: int = 0,
    teacher_params: PyTree | None = None,
    distance: PyTree | None = None,
    params: PyTree | None = None,
) -> tuple[TrainState, PyTree]:
    """The train state created directly with its shardings: θ, θ⁻, the eval EMAs and the optimizer
    state are initialised by one ``jax.jit`` whose ``out_shardings`` split them over the mesh, so no
    device ever holds more than its share (the state is never built whole on one device and then
    copied out). Every process runs the same program (multi-host safe).

    Args:
      init_params: rng -> θ (``build_network``'s ``init``).
      tx: the optimizer.
      method: decides whether a separate θ⁻ is kept (``method.keeps_target``).
      ema_rates: the eval EMA rates.
      rng: the initialisation key.
      mesh: the ("data", "fsdp") mesh.
      min_size: leaves with fewer elements stay replicated (``config.mesh.fsdp_min_size``).
      teacher_params: φ, already placed on the mesh (``build_teacher``), attached if the method
        reads a teacher.
      distance: the method's distance; one with weights (LPIPS) is placed on the mesh and travels in
        the state (an input of the compiled step rather than ~59 MB of baked-in constants) if the
        method declares it.
      params: θ to start from (``load_init_params``, already on the mesh with θ's shardings)
        instead of ``init_params(rng)``; θ⁻ and every eval EMA start as copies of it.

    Returns:
      (state, the shardings of every leaf of the state, for ``sharding.jit_train_step``).
    """

    def create(start):
        return TrainState.create(
            init_params(rng) if start is None else start,
            tx,
            ema_rates=ema_rates,
            use_target=method.keeps_target,
        )

    abstract = jax.eval_shape(create, params)
    shardings = sharding_lib.state_shardings(abstract, mesh, min_size=min_size)
    state = jax.jit(create, out_shardings=shardings)(params)
    frozen = set(method.frozen_trees)
    if "distance" in frozen:
        distance = sharding_lib.place(distance, fsdp_shardings(mesh, min_size)(distance))
    state = state.replace(
        teacher_params=teacher_params if "teacher" in frozen else None,
        distance=distance if "distance" in frozen else None,
    )
    logging.info(
        "Created the train state on the mesh: %d copies of θ (θ%s, %d EMA), split over fsdp=%d.",
        1 + int(method.keeps_target) + len(ema_rates),
        ", θ⁻" if method.keeps_target else "",
        len(ema_rates),
        mesh.shape[sharding_lib.FSDP_AXIS],
    )
    return state, sharding_lib.state_shardings(state, mesh, min_size=min_size)
