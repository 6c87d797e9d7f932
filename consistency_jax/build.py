"""Building a run from its config: data, network, teacher, distance, method, optimizer and the train
state, created directly with its shardings on the mesh; beside each builder the check of its slice of
the config, and ``validate``, which runs them all before anything is compiled or written.

``validate(config)`` is the one entry point of config checking (``experiment.train_and_evaluate``
calls it first); each ``check_*`` names the bad field. The builders assume a validated config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from consistency_jax import config as config_lib
from consistency_jax import guidance as guidance_lib
from consistency_jax import losses as losses_lib
from consistency_jax import methods as methods_lib
from consistency_jax import networks, toy
from consistency_jax import sharding as sharding_lib
from consistency_jax.networks import layers
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
    """The configured network with what the run's method adds beside it (``methods.network``):
    (module, apply_fn, init(rng) -> θ in float32)."""
    module = methods_lib.network(config)
    labels = bool(config.data.use_labels)

    def init(rng):
        return networks.init_params(module, rng, tuple(example_shape), labels=labels)

    return module, networks.make_apply_fn(module), init


def network_shapes(config: ml_collections.ConfigDict, example_shape: tuple[int, ...]) -> PyTree:
    """The shapes of θ that ``build_network``'s init gives (traced once per network and data
    shape: ``networks.layers.init_shapes``)."""
    module = methods_lib.network(config)
    return layers.init_shapes(
        module, (1,) + tuple(example_shape), labels=bool(config.data.use_labels)
    )


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
    if spec.teacher is not None:  # another run's parameters as they are (TCM's stage-1 model)
        from consistency_jax import loading

        return None, loading.load_teacher_source(config, spec.teacher, sharding=shardings)[0]
    if config.teacher.workdir == "exact":
        params = toy.ring_mixture().as_params()
        return toy.exact_denoiser, sharding_lib.place(params, shardings(params))
    from consistency_jax import loading

    # The teacher's slowest (or chosen) EMA, read-only, restored straight into its shardings; never
    # saved into this run's checkpoints.
    denoise, params = loading.load_teacher(
        config.teacher.workdir, ema_rate=config.teacher.ema_rate or None, sharding=shardings
    )
    omega = float(config.teacher.guidance)
    if omega != 1.0:  # D_ω = ω·D(x|c) + (1 − ω)·D(x|∅), the last label meaning ∅ (check_teacher)
        null = int(config.model.kwargs.num_classes) - 1
        denoise = guidance_lib.guided_denoiser(denoise, omega, null)
    return denoise, params


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


def init_fresh_addition(
    source: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> methods_lib.NetworkAddition | None:
    """The network addition of this run's method (``MethodSpec.network_addition``, e.g. sCM's
    weighting head) when this run has it and the ``config.init`` source run has not: it starts fresh,
    the source's θ initialises the network inside it (at ``addition.inner``). None otherwise."""
    addition = methods_lib.get(config.method).network_addition
    if addition is None or not config.model.get(addition.field, False):
        return None
    return None if source.model.get(addition.field, False) else addition


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
    fresh = init_fresh_addition(source, config)
    if fresh is not None:  # e.g. sCM's weighting head starts fresh; the source's θ is its "net"
        abstract = whole[fresh.inner]
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
    if fresh is not None:
        new = jax.jit(init_params, out_shardings=shardings(whole))(jax.random.key(config.seed))
        params = jax.tree.unflatten(
            jax.tree.structure(whole), jax.tree.leaves({**new, fresh.inner: params})
        )
        logging.info(
            "config.init: config.model.%s (method=%s) starts fresh beside the source's network.",
            fresh.field,
            config.method,
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


# ----------------------------------------------------------------------------------------------------
# Checking a config: each builder's slice, then ``validate`` runs them all


@dataclasses.dataclass(frozen=True)
class Setup:
    """The typed pieces of a validated config.

    Attributes:
      spec: the method's plug-in (``methods.MethodSpec``).
      sigmas: the noise configuration.
      ema_rates: the eval EMA rates kept.
      num_steps: optimizer steps of the run.
      mesh: the ("data", "fsdp") device mesh.
      microbatches, steps_per_call: ``config.train.*`` as ints.
    """

    spec: Any
    sigmas: Any
    ema_rates: tuple[float, ...]
    num_steps: int
    mesh: Any
    microbatches: int
    steps_per_call: int


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` when it is an integer >= ``minimum``; else a ValueError naming ``config.<name>``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def example_shape_of(config) -> tuple[tuple[int, ...], str] | None:
    """(one example's shape, its description) when the config fixes it (the toy; images with
    data.image_size and data.num_channels); None when only the data layer knows it."""
    if config.data.name in TOY_DATASETS:
        return (2,), "2-D toy points"
    if config.data.image_size > 0 and config.data.num_channels > 0:
        s, ch = config.data.image_size, config.data.num_channels
        return (s, s, ch), f"{s}x{s}x{ch} images (config.data.image_size/num_channels)"
    return None


def check_data(config) -> None:
    """``config.data``: the data set name (toy_ring, sklearn_digits/<size>, or a TFDS name, checked
    against the TFDS registry, which works offline), the reader, the shuffle buffer, the batch."""
    d = config.data
    if not d.name:
        raise ValueError("config.data.name is empty.")
    known = d.name in TOY_DATASETS or d.name.split("/")[0] == config_lib.DIGITS_DATASET
    if not known and ":" not in d.name:  # community data sets ("namespace:name") are left to TFDS
        import tensorflow_datasets as tfds  # only for image data

        try:
            tfds.builder_cls(d.name.split("/")[0])
        except tfds.core.DatasetNotFoundError:
            raise ValueError(
                f"Unknown data set {d.name!r} (config.data.name): not one of {TOY_DATASETS}, "
                f"'{config_lib.DIGITS_DATASET}/<size>', nor a TFDS data set name."
            ) from None
    if d.reader not in config_lib.READERS:
        raise ValueError(
            f"config.data.reader must be one of {config_lib.READERS}, got {d.reader!r}."
        )
    positive_int(d.shuffle_buffer, "data.shuffle_buffer", minimum=0)
    positive_int(d.batch_size, "data.batch_size")


def check_network(config) -> None:
    """``config.model``: a known network and dtype; then traces (jax.eval_shape, nothing is compiled)
    the network's init on the configured data shape, so that kwargs the network does not take, or an
    image size it cannot down-sample, fail here. A ``config.model`` flag of a network addition
    (``MethodSpec.network_addition``) is refused for a method that does not add it."""
    if config.model.name not in networks.network_names():
        raise ValueError(
            f"Unknown network {config.model.name!r} (config.model.name); "
            f"known networks: {', '.join(networks.network_names())}."
        )
    if config.model.dtype not in config_lib.DTYPES:
        raise ValueError(
            f"config.model.dtype must be one of {config_lib.DTYPES}, got {config.model.dtype!r}."
        )
    mine = methods_lib.get(config.method).network_addition
    for name, spec in sorted(methods_lib.registered().items()):
        field = spec.network_addition.field if spec.network_addition else None
        if field and config.model.get(field, False) and (mine is None or mine.field != field):
            raise ValueError(
                f"config.model.{field}=True is what method={name!r} adds to its network; "
                f"method={config.method!r} does not use it."
            )
    shape = example_shape_of(config)
    if shape is None:
        return  # the data layer knows the shape
    try:
        network_shapes(config, shape[0])  # the init the run will use
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"The network {config.model.name!r} (config.model) cannot take {shape[1]}: {e}"
        ) from e


def check_optimizer(config) -> None:
    """``config.optim``: a known optimizer and decay, a finite positive lr, β in [0, 1), ε > 0."""
    o = config.optim
    if o.name not in config_lib.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {o.name!r} (config.optim.name); one of {config_lib.OPTIMIZERS}."
        )
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not number(o.lr) or not math.isfinite(o.lr) or not o.lr > 0:
        raise ValueError(
            f"config.optim.lr must be a finite positive number, got {o.lr!r} (e.g. 1e-4)."
        )
    if o.decay not in config_lib.LR_DECAYS:
        raise ValueError(
            f"Unknown lr decay {o.decay!r} (config.optim.decay); one of {config_lib.LR_DECAYS}."
        )
    if o.warmup_steps < 0 or o.grad_clip < 0:
        raise ValueError(
            "config.optim.warmup_steps and config.optim.grad_clip must be >= 0, got "
            f"{o.warmup_steps} and {o.grad_clip}."
        )
    for name in ("b1", "b2"):
        if not 0.0 <= o[name] < 1.0:
            raise ValueError(f"config.optim.{name} must lie in [0, 1), got {o[name]}.")
    if not o.eps > 0:
        raise ValueError(f"config.optim.eps must be positive, got {o.eps}.")


def check_train(config) -> tuple[int, tuple[float, ...], int, int]:
    """``config.train``: the length, cadences, EMA rates, skip limits, microbatches and steps per
    call. Returns (num_steps, ema_rates, microbatches, steps_per_call)."""
    from consistency_jax.train_state import check_ema_rate

    t = config.train
    num_steps = positive_int(t.num_steps, "train.num_steps")
    for name in ("log_every", "eval_every"):
        positive_int(t[name], f"train.{name}")
    positive_int(t.max_consecutive_skips, "train.max_consecutive_skips", minimum=0)
    fraction = t.max_skip_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"config.train.max_skip_fraction must lie in (0, 1] (1: no limit), got {fraction!r}."
        )
    jump = t.max_norm_jump
    if isinstance(jump, bool) or not isinstance(jump, (int, float)) or not (jump == 0 or jump > 1):
        raise ValueError(
            f"config.train.max_norm_jump must be 0 (no check) or a factor > 1, got {jump!r}."
        )
    micro = positive_int(t.microbatches, "train.microbatches")
    per_call = positive_int(t.steps_per_call, "train.steps_per_call")
    for name, every in (("train.log_every", t.log_every), ("train.eval_every", t.eval_every)):
        if every % per_call:
            raise ValueError(
                f"config.{name}={every} is not a multiple of config.train.steps_per_call="
                f"{per_call}: the loop only sees every steps_per_call-th step."
            )
    rates = tuple(check_ema_rate(r, "Every EMA rate (config.train.ema_rates)") for r in t.ema_rates)
    return num_steps, rates, micro, per_call


def check_checkpoint(config) -> None:
    """``config.checkpoint``: the cadence and retention, on the steps the loop sees."""
    from consistency_jax import checkpoint

    c = config.checkpoint
    checkpoint.check_cadence(c.every, c.keep, c.keep_every)
    per_call = config.train.steps_per_call
    if c.every % per_call:
        raise ValueError(
            f"config.checkpoint.every={c.every} is not a multiple of config.train.steps_per_call="
            f"{per_call}: the loop only sees every steps_per_call-th step."
        )


def check_sigmas(config):
    """``config.sigmas`` as a ``parameterization.SigmaConfig``."""
    from consistency_jax import parameterization

    try:
        return parameterization.SigmaConfig(**config.sigmas.to_dict())
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.sigmas: {e}") from e


def check_distance(config, spec) -> None:
    """LPIPS weights are read when the run is built: their file and net are checked here first."""
    if not spec.uses_distance or config.loss.distance != "lpips":
        return
    lc = config.loss
    if lc.lpips_net not in ("vgg", "alex"):
        raise ValueError(f"config.loss.lpips_net must be 'vgg' or 'alex', got {lc.lpips_net!r}.")
    if not lc.lpips_weights or not os.path.isfile(lc.lpips_weights):
        raise ValueError(
            f"config.loss.distance='lpips' needs config.loss.lpips_weights, a .safetensors "
            f"file made by tools/convert_lpips_weights.py; got {lc.lpips_weights!r}"
            f"{' (no such file)' if lc.lpips_weights else ''}."
        )


def check_teacher(config, spec) -> None:
    """``config.teacher``: a method that needs one has a denoiser run with a readable checkpoint
    (its JSON only), or 'exact' on the toy."""
    from consistency_jax.train_state import check_ema_rate

    check_ema_rate(config.teacher.ema_rate, "config.teacher.ema_rate")
    omega = config.teacher.guidance
    if not isinstance(omega, (int, float)) or isinstance(omega, bool) or omega < 0:
        raise ValueError(f"config.teacher.guidance must be a number >= 0, got {omega!r}.")
    guided = omega != 1.0
    if guided and (not spec.needs_teacher or spec.teacher is not None):
        raise ValueError(
            f"config.teacher.guidance={omega} guides the EDM teacher of a distillation method (cd, "
            f"scd, cm_continuous_cd); method={spec.name!r} reads none."
        )
    if not spec.needs_teacher:
        return
    if spec.teacher is not None:  # another run's parameters as they are (TCM's stage-1 model)
        from consistency_jax import loading

        loading.teacher_source_config(config, spec.teacher)
        return
    from consistency_jax import loading

    workdir = config.teacher.workdir
    if not workdir:
        raise ValueError(
            f"method={spec.name!r} needs a teacher: set config.teacher.workdir to the EDM "
            "teacher's workdir (or 'exact' for the toy's exact denoiser)."
        )
    if workdir == "exact":
        if config.data.name not in TOY_DATASETS:
            raise ValueError("config.teacher.workdir='exact' exists only for the toy data sets.")
        if guided:
            raise ValueError("config.teacher.guidance needs a class-conditional EDM teacher run.")
        return
    teacher = loading.teacher_config(workdir)
    if guided:
        classes = config.model.kwargs.get("num_classes") if config.data.use_labels else None
        theirs = teacher.model.kwargs.get("num_classes")
        if not classes or theirs != classes:
            raise ValueError(
                f"config.teacher.guidance={omega} guides a class-conditional student of a teacher "
                f"with the same labels: this run has num_classes={classes} (data.use_labels="
                f"{config.data.use_labels}), the teacher {theirs}."
            )
        if not teacher.loss.get("edm_class_dropout", 0.0) > 0:
            raise ValueError(
                f"config.teacher.guidance={omega}: the teacher {workdir} was trained without label "
                "dropout (loss.edm_class_dropout=0), so its last label was never the unconditional "
                "model D(x|∅); train it with --config.loss.edm_class_dropout=0.1."
            )


# Fields of config.model that change no parameter: a run may start from a run that differs there.
INIT_FREE_MODEL_FIELDS = ("model.kwargs.dropout", "model.dtype")
# Fields outside config.model that fix what the network's inputs mean.
INIT_NETWORK_FIELDS = ("sigmas.sigma_data", "sigmas.c_noise")


def network_kind(config) -> str:
    """What a run's network parameters mean, for ``config.init``: its method's ``network_kind``."""
    return methods_lib.get(config.method).network_kind(config)


def check_init(config) -> None:
    """``config.init``: the source run holds a readable checkpoint of the same network (its config
    and its parameters' shapes and dtypes are read; no array is loaded, nothing compiled), of the
    same network kind (``MethodSpec.network_kind``)."""
    from consistency_jax import checkpoint, loading
    from consistency_jax.train_state import check_ema_rate

    rate = check_ema_rate(config.init.ema_rate, "config.init.ema_rate")
    workdir = config.init.workdir
    if not workdir:
        if rate:
            raise ValueError(
                f"config.init.ema_rate={rate} is set but config.init.workdir is empty."
            )
        return
    where = f"config.init.workdir={workdir!r}"
    hint = " (to resume a run that started from it, clear config.init.workdir)"
    try:
        source, step, abstract = loading.eval_params_metadata(workdir, rate or None)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{where}: {e}{hint}") from e
    # A field the source run's config predates has its default value there (e.g. model.logvar_head).
    # A network addition may be new here (it starts fresh; the source's θ becomes its inner part).
    fresh = init_fresh_addition(source, config)
    free = INIT_FREE_MODEL_FIELDS + ((f"model.{fresh.field}",) if fresh is not None else ())
    diffs = [
        f"{k}: {theirs!r} -> {mine!r}"
        for k, theirs, mine in checkpoint.differing_fields(
            checkpoint.config_to_dict(source),
            checkpoint.config_to_dict(config),
            ignore_resumable=False,
            defaults=methods_lib.default_values(),
        )
        if (k.startswith("model.") or k in INIT_NETWORK_FIELDS) and k not in free
    ]
    if diffs:
        raise ValueError(
            f"{where} (step {step}) has another network than this run; differing fields "
            f"(source -> this run): {'; '.join(diffs)}."
        )
    theirs, mine = network_kind(source), network_kind(config)
    if theirs != mine:
        raise ValueError(
            f"{where} (step {step}, method={source.method}) holds {theirs}, this run (method="
            f"{config.method}) trains {mine}: the parameters would mean another function. A TrigFlow "
            "method (sct, scd) starts from an EDM-preconditioned run only as an EDM network: set "
            "--config.sigmas.trigflow_time=edm (and the source's sigmas.trigflow_time must match for "
            "a TrigFlow source)."
        )
    shape = example_shape_of(config)
    if shape is None:
        return  # the shape comparison needs the data shape; the restore checks it when loading
    want = network_shapes(config, shape[0])
    if fresh is not None:
        want = want[fresh.inner]
    got, need = leaf_shapes(abstract, dtypes=True), leaf_shapes(want, dtypes=True)
    if got != need:
        bad = sorted(k for k in set(got) | set(need) if got.get(k) != need.get(k))
        raise ValueError(
            f"{where} (step {step}): its parameters do not fit this run's network "
            "(data shape or labels differ?); first differing leaves (source -> this "
            f"run): "
            + "; ".join(
                f"{k}: {got.get(k, '<absent>')} -> {need.get(k, '<absent>')}" for k in bad[:5]
            )
            + "."
        )


def check_mesh(config, micro: int):
    """``config.mesh`` and how the global batch (and each microbatch) splits over it; returns the
    mesh."""
    positive_int(config.mesh.fsdp_min_size, "mesh.fsdp_min_size", minimum=0)
    mesh = sharding_lib.mesh_from_config(config)
    sharding_lib.check_global_batch(config.data.batch_size, mesh)
    if config.data.batch_size % micro:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} does not split into "
            f"config.train.microbatches={micro} equal microbatches."
        )
    if micro > 1:  # every device holds an equal part of every microbatch
        sharding_lib.check_global_batch(
            config.data.batch_size // micro,
            mesh,
            name="config.data.batch_size / config.train.microbatches",
        )
    return mesh


def validate(config: ml_collections.ConfigDict) -> Setup:
    """Checks every field of a run config, before anything is compiled or written: each builder's
    slice in turn (method, network, train, checkpoint, optimizer, data, sigmas, the method's own
    fields, distance, evaluation, mesh, teacher, init).

    Returns:
      the typed pieces (``Setup``), including the device mesh.

    Raises:
      ValueError: naming the first bad field (``checkpoint.CheckpointError``, a ValueError, for a
        CD teacher directory that holds no usable run).
    """
    from consistency_jax.evaluators import samples as eval_samples

    spec = methods_lib.get(config.method)
    missing = sorted(
        p for p in config_lib.field_paths(methods_lib.schema()) if "." in p and not _has(config, p)
    )
    if missing:
        raise ValueError(
            f"The config lacks the fields {', '.join('config.' + p for p in missing[:5])}: build "
            "it with config.base_config() and methods.apply_preset (which adds every method's "
            "block)."
        )
    num_steps, rates, micro, per_call = check_train(config)
    check_checkpoint(config)
    check_optimizer(config)
    check_data(config)
    sigmas = check_sigmas(config)
    spec.check(config)
    check_distance(config, spec)
    eval_samples.check_config(config, spec, sigmas, rates, config.data.name in TOY_DATASETS)
    mesh = check_mesh(config, micro)
    check_network(config)
    check_teacher(config, spec)
    check_init(config)
    return Setup(
        spec=spec,
        sigmas=sigmas,
        ema_rates=rates,
        num_steps=num_steps,
        mesh=mesh,
        microbatches=micro,
        steps_per_call=per_call,
    )


def _has(config, path: str) -> bool:
    node = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True
