"""``train_and_evaluate(config, workdir)``: the training loop around the pure train step.

Everything the config asks for is checked (``parse_config``) before anything is compiled or written.
The loop logs progress (step, loss, steps/s, ETA), evaluates every ``train.eval_every`` steps and at
the end, and writes ``metrics.jsonl`` (one JSON object per evaluation), PNG pictures of samples and
TensorBoard scalars into the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from consistency_jax import checkpoint as ckpt_lib
from consistency_jax import losses as losses_lib
from consistency_jax import parameterization as param_lib
from consistency_jax import sampling
from consistency_jax import schedules
from consistency_jax import sharding as sharding_lib
from consistency_jax import toy
from consistency_jax import toy_data
from consistency_jax.networks import get_network, make_apply_fn, network_names
from consistency_jax.train import make_train_step
from consistency_jax.train_state import TrainState, ema_key

METHODS = ("cd", "ct", "ict", "edm")
TOY_DATASETS = ("toy_ring",)


class NonFiniteError(FloatingPointError):
    """Raised when a train step produced a NaN or Inf loss or gradient."""


# ----------------------------------------------------------------------------------------------------
# Config -> typed pieces, validated before anything compiles


@dataclasses.dataclass(frozen=True)
class Setup:
    method: str
    sigmas: param_lib.SigmaConfig
    curriculum: schedules.Curriculum
    loss: losses_lib.LossConfig
    ema_rates: tuple[float, ...]
    num_steps: int


DIGITS_DATASET = "sklearn_digits"


def _check_dataset_name(name: str) -> None:
    """toy_ring, sklearn_digits/<size>, or a TFDS name (checked against the TFDS registry, which
    works offline; whether the data is prepared is the data layer's business)."""
    if name in TOY_DATASETS or name.split("/")[0] == DIGITS_DATASET:
        return
    if not name or ":" in name:  # community data sets ("namespace:name") are left to TFDS
        if not name:
            raise ValueError("config.data.name is empty.")
        return
    import tensorflow_datasets as tfds  # only for image data

    try:
        tfds.builder_cls(name.split("/")[0])
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"Unknown data set {name!r} (config.data.name): not one of {TOY_DATASETS}, "
                         f"'{DIGITS_DATASET}/<size>', nor a TFDS data set name.") from None


def _check_network_input(config: ml_collections.ConfigDict) -> None:
    """Traces (jax.eval_shape, nothing is compiled) the network's init on the configured data shape,
    so that kwargs the network does not take, or an image size it cannot down-sample, fail here."""
    if config.data.name in TOY_DATASETS:
        shape, what = (2,), "2-D toy points"
    elif config.data.image_size > 0 and config.data.num_channels > 0:
        s, ch = config.data.image_size, config.data.num_channels
        shape, what = (s, s, ch), f"{s}x{s}x{ch} images (config.data.image_size/num_channels)"
    else:
        return  # the data layer knows the shape
    try:
        kwargs = dict(config.model.kwargs)
        if config.model.dtype != "float32":
            kwargs["dtype"] = jnp.dtype(config.model.dtype)
        module = get_network(config.model.name, **kwargs)
        labels = jnp.zeros((1,), jnp.int32) if config.data.use_labels else None
        jax.eval_shape(lambda r: module.init({"params": r, "dropout": r},
                                             jnp.zeros((1,) + shape), jnp.zeros((1,)), labels),
                       jax.random.key(0))
    except (ValueError, TypeError) as e:
        raise ValueError(f"The network {config.model.name!r} (config.model) cannot take {what}: "
                         f"{e}") from e


def _check_run_config(config: ml_collections.ConfigDict, rates: tuple[float, ...]) -> None:
    """The checks of parse_config beyond the typed pieces: names, shapes, EMA choices, cadences."""
    _check_dataset_name(config.data.name)
    reader = config.data.get("reader", "auto")
    if reader not in ("auto", "data_source", "tfds_load"):
        raise ValueError(f"config.data.reader must be one of ('auto', 'data_source', 'tfds_load'), got "
                         f"{reader!r}.")
    if config.eval.ema_rate and float(config.eval.ema_rate) not in rates:
        raise ValueError(f"config.eval.ema_rate={config.eval.ema_rate} is not one of the EMA rates "
                         f"kept (config.train.ema_rates={rates}); 0 picks the slowest.")
    if not 0.0 <= config.teacher.ema_rate < 1.0:
        raise ValueError(f"config.teacher.ema_rate must lie in [0, 1) (0: the teacher's slowest "
                         f"EMA), got {config.teacher.ema_rate}.")
    if config.optim.decay not in ("constant", "cosine"):
        raise ValueError(f"Unknown lr decay {config.optim.decay!r} (config.optim.decay): constant "
                         "or cosine.")
    if config.optim.warmup_steps < 0 or config.optim.grad_clip < 0:
        raise ValueError("config.optim.warmup_steps and config.optim.grad_clip must be >= 0, got "
                         f"{config.optim.warmup_steps} and {config.optim.grad_clip}.")
    c = config.checkpoint
    if c.every < 1 or c.keep < 1 or c.keep_every < 0:
        raise ValueError(f"Need config.checkpoint.every >= 1, keep >= 1 and keep_every >= 0, got "
                         f"every={c.every}, keep={c.keep}, keep_every={c.keep_every}.")
    micro = config.train.get("microbatches", 1)
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ValueError(f"config.train.microbatches must be a positive integer, got {micro!r}.")
    if config.data.batch_size % micro:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} does not split into "
                         f"config.train.microbatches={micro} equal microbatches.")
    per_call = config.train.get("steps_per_call", 1)
    if not isinstance(per_call, int) or isinstance(per_call, bool) or per_call < 1:
        raise ValueError(f"config.train.steps_per_call must be a positive integer, got {per_call!r}.")
    for name, every in (("train.log_every", config.train.log_every),
                        ("train.eval_every", config.train.eval_every), ("checkpoint.every", c.every)):
        if every % per_call:
            raise ValueError(f"config.{name}={every} is not a multiple of config.train.steps_per_call="
                             f"{per_call}: the loop only sees every steps_per_call-th step.")
    _check_network_input(config)


def parse_config(config: ml_collections.ConfigDict) -> Setup:
    """Validates the config and turns it into typed pieces. Raises ValueError naming the bad field."""
    if config.method not in METHODS:
        raise ValueError(f"Unknown method {config.method!r}; choose one of {METHODS}.")
    if config.model.name not in network_names():
        raise ValueError(f"Unknown network {config.model.name!r} (config.model.name); "
                         f"known networks: {', '.join(network_names())}.")
    if config.train.num_steps < 1:
        raise ValueError(f"config.train.num_steps must be positive, got {config.train.num_steps}.")
    if config.data.batch_size < 1:
        raise ValueError(f"config.data.batch_size must be positive, got {config.data.batch_size}.")
    for name in ("log_every", "eval_every"):
        if config.train[name] < 1:
            raise ValueError(f"config.train.{name} must be positive, got {config.train[name]}.")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {config.model.dtype!r}.")
    if config.optim.name not in ("adam", "radam"):
        raise ValueError(f"Unknown optimizer {config.optim.name!r} (config.optim.name): adam or radam.")
    if not config.optim.lr > 0:
        raise ValueError(f"config.optim.lr must be positive, got {config.optim.lr}.")
    rates = tuple(float(r) for r in config.train.ema_rates)
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"EMA rates (config.train.ema_rates) must lie in [0, 1), got {r}.")
    _check_run_config(config, rates)
    try:
        sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.sigmas: {e}") from e
    cur = config.curriculum
    if cur.kind == "cm" and cur.s0 < 2:
        raise ValueError(f"config.curriculum.s0 must be at least 2 for kind='cm' (N(0) = s0 "
                         f"discretisation points, N >= 2), got {cur.s0}.")
    try:
        curriculum = schedules.Curriculum(
            kind=cur.kind, num_scales=cur.num_scales, mu0=cur.mu0, s0=cur.s0, s1=cur.s1,
            total_steps=cur.total_steps or config.train.num_steps, mu_form=cur.mu_form)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.curriculum: {e}") from e
    lc = config.loss
    try:
        loss = losses_lib.LossConfig(
            method={"ict": "ct"}.get(config.method, config.method), distance=lc.distance,
            weighting=lc.weighting, index_sampling=lc.index_sampling, solver=lc.solver,
            huber_c=lc.huber_c)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.loss: {e}") from e
    if config.method == "cd" and not config.teacher.workdir:
        raise ValueError("method='cd' needs a teacher: set config.teacher.workdir to the EDM teacher's "
                         "workdir (or 'exact' for the toy's exact denoiser).")
    if config.method == "cd" and config.teacher.workdir == "exact" and \
            config.data.name not in TOY_DATASETS:
        raise ValueError("teacher.workdir='exact' exists only for the toy data sets.")
    if config.method == "cd" and config.teacher.workdir != "exact":
        ckpt_lib.teacher_config(config.teacher.workdir)  # an EDM run with a readable checkpoint
    return Setup(method=config.method, sigmas=sigmas, curriculum=curriculum, loss=loss,
                 ema_rates=rates, num_steps=int(config.train.num_steps))


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                 optax.Schedule]:
    """optax Adam/RAdam with linear warm-up, optional cosine decay and global-norm clipping."""
    o = config.optim
    steps = config.train.num_steps
    if o.decay == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1),
                                                      max(steps, o.warmup_steps + 1), o.lr * 0.01)
    elif o.decay == "constant":
        schedule = (optax.linear_schedule(0.0, o.lr, o.warmup_steps) if o.warmup_steps else
                    optax.constant_schedule(o.lr))
        if o.warmup_steps:
            schedule = optax.join_schedules([schedule, optax.constant_schedule(o.lr)],
                                            [o.warmup_steps])
    else:
        raise ValueError(f"Unknown lr decay {o.decay!r} (config.optim.decay): constant or cosine.")
    opt = {"adam": optax.adam, "radam": optax.radam}[o.name](schedule, b1=o.b1, b2=o.b2, eps=o.eps)
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt
    return tx, schedule


# ----------------------------------------------------------------------------------------------------
# Data, model, teacher


def build_data(config: ml_collections.ConfigDict, start_step: int = 0):
    """Returns (iterator, example_shape) for the configured data set."""
    if config.data.name in TOY_DATASETS:
        it = toy_data.ToyIterator(toy.ring_mixture(), config.data.batch_size // jax.process_count(),
                                  config.seed, process_index=jax.process_index(),
                                  start_step=start_step)
        return it, (2,)
    from consistency_jax import data as data_lib  # image pipeline (tfds); imported only when needed

    return data_lib.iterator_from_config(config, start_step=start_step)


def build_model(config: ml_collections.ConfigDict, example_shape: tuple[int, ...], rng):
    """Builds the network named in the config and initialises θ (float32)."""
    kwargs = dict(config.model.kwargs)
    if config.model.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.model.dtype)
    module = get_network(config.model.name, **kwargs)
    x = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.data.use_labels else None
    params = jax.jit(lambda r: module.init({"params": r, "dropout": r}, x, jnp.zeros((1,)), labels)
                     ["params"])(rng)
    return module, make_apply_fn(module), params


def build_teacher(config: ml_collections.ConfigDict, setup: Setup):
    """Returns (teacher_denoise, teacher_params) for CD, or (None, None)."""
    if setup.method != "cd":
        return None, None
    if config.teacher.workdir == "exact":
        return toy.exact_denoiser, toy.ring_mixture().as_params()
    # The EDM teacher's slowest (or chosen) EMA, read-only; never saved into this run's checkpoints.
    return ckpt_lib.load_teacher(config.teacher.workdir, ema_rate=config.teacher.ema_rate or None)


def build_distance(config: ml_collections.ConfigDict, setup: Setup, example_shape):
    lpips_fn = None
    if setup.loss.distance == "lpips":
        if not config.loss.lpips_weights:
            losses_lib.make_distance("lpips", example_shape)  # raises the explanatory error
        from consistency_jax.metrics import lpips as lpips_lib

        params = lpips_lib.load_lpips_params(config.loss.lpips_weights, net=config.loss.lpips_net)
        lpips_fn = lpips_lib.make_lpips_distance(params, net=config.loss.lpips_net)
    return losses_lib.make_distance(setup.loss.distance, example_shape, huber_c=setup.loss.huber_c,
                                    lpips_fn=lpips_fn)


def build_loss(setup: Setup, apply_fn, distance, teacher):
    if setup.method == "edm":
        return losses_lib.make_edm_loss(setup.loss, apply_fn, setup.sigmas)
    return losses_lib.make_consistency_loss(setup.loss, apply_fn, setup.sigmas, setup.curriculum,
                                            distance, teacher=teacher)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def eval_params(state: TrainState, config) -> Any:
    return state.eval_params(config.eval.ema_rate or None)


def two_step_times(config, setup: Setup) -> tuple[float, ...]:
    """The times of 2-step sampling: grid indices from T on the curriculum's final grid (the official
    code's convention, e.g. (0, 22, 39) for ImageNet-64 CD), else (T, config.eval.two_step_time)."""
    if config.eval.two_step_indices:
        return sampling.times_from_indices(tuple(config.eval.two_step_indices),
                                           setup.curriculum.max_scales, setup.sigmas)
    return (setup.sigmas.sigma_max, float(config.eval.two_step_time))


class SampleGenerator:
    """The samples to look at: 1-step and 2-step for consistency models, EDM Heun for teachers.

    The samplers are jitted once, on the first call, with the parameters as an argument, and reused at
    every evaluation of the run (``apply_fn`` is fixed for a run).
    """

    def __init__(self, setup: Setup, config, shape, labels=None):
        self.setup, self.shape, self.labels = setup, tuple(shape), labels
        self.edm_steps = int(config.eval.edm_steps)
        self.two_step = two_step_times(config, setup)
        self._samplers = None

    def _build(self, apply_fn) -> dict:
        sigmas, shape = self.setup.sigmas, self.shape
        if self.setup.method == "edm":
            n = self.edm_steps

            def heun(params, rng, labels):
                denoise = lambda x, t: param_lib.denoiser_fn(apply_fn, params, x, t, sigmas,
                                                             labels=labels)
                return sampling.edm_heun_sample(denoise, rng, shape, sigmas, n)

            return {f"heun_{2 * n - 1}nfe": jax.jit(heun)}
        clip = 1.0 if len(shape) == 4 else None
        return {name: sampling.make_sampler(apply_fn, sigmas, ts, shape, clip=clip)
                for name, ts in (("1step", (sigmas.sigma_max,)), ("2step", self.two_step))}

    def __call__(self, apply_fn, params, rng) -> dict[str, np.ndarray]:
        if self._samplers is None:
            self._samplers = self._build(apply_fn)
        return {name: np.asarray(fn(params, rng, self.labels))
                for name, fn in self._samplers.items()}


class ToyEvaluator:
    """Sliced-W2 and energy distance of samples to fresh data, beside the noise floor of two
    independent data sets of the same size; for CD also the error of the one-step map against the
    exact PF-ODE map x_T -> x_ε."""

    def __init__(self, config, setup: Setup, num_map_points: int = 500):
        from consistency_jax.metrics import energy_distance, sliced_wasserstein2

        self.ed, self.sw2 = energy_distance, sliced_wasserstein2
        self.config, self.setup = config, setup
        self.mixture = toy.ring_mixture()
        n = config.eval.num_samples
        rng = np.random.default_rng([config.seed, 12345])
        self.data = self.mixture.sample(rng, n)
        # The noise floor: the same figures between independent data sets of the same size, averaged
        # over several pairs (one pair's value fluctuates by tens of percent with the mode counts).
        pairs = [(self.mixture.sample(rng, n), self.mixture.sample(rng, n)) for _ in range(8)]
        self.floor = {"sw2_floor": float(np.mean([self.sw2(a, b) for a, b in pairs])),
                      "ed_floor": float(np.mean([self.ed(a, b) for a, b in pairs]))}
        self.generate = SampleGenerator(setup, config, (n, 2))
        self.map_points = None
        if setup.method == "cd":
            t_max, t_min = setup.sigmas.sigma_max, setup.sigmas.sigma_min
            self.map_points = t_max * rng.standard_normal((num_map_points, 2))
            self.map_truth = toy.ode_map(self.mixture, self.map_points, t_max, t_min)

    def __call__(self, apply_fn, params, rng) -> tuple[dict, dict]:
        samples = self.generate(apply_fn, params, rng)
        figures = dict(self.floor)
        for name, x in samples.items():
            figures[f"sw2_{name}"] = self.sw2(x, self.data)
            figures[f"ed_{name}"] = self.ed(x, self.data)
            figures[f"sw2_ratio_{name}"] = figures[f"sw2_{name}"] / self.floor["sw2_floor"]
        if self.map_points is not None:
            t = jnp.full((len(self.map_points),), self.setup.sigmas.sigma_max)
            x1 = param_lib.consistency_fn(apply_fn, params, jnp.asarray(self.map_points, jnp.float32),
                                          t, self.setup.sigmas)
            err = np.linalg.norm(np.asarray(x1, np.float64) - self.map_truth, axis=1)
            figures["map_error"] = float(err.mean())
            figures["map_error_over_sigma_data"] = float(err.mean() / self.setup.sigmas.sigma_data)
        return figures, samples

    def plot(self, samples: dict, path: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
        for ax, (name, x) in zip(axes[0], samples.items()):
            ax.scatter(self.data[:, 0], self.data[:, 1], s=2, c="tab:gray", alpha=0.4, label="data")
            ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.6, label=name)
            ax.set_xlim(-1.2, 1.2)
            ax.set_ylim(-1.2, 1.2)
            ax.set_aspect("equal")
            ax.set_title(f"{name}")
            ax.legend(loc="upper right", markerscale=4, fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def build_evaluator(config, setup: Setup, example_shape):
    if config.data.name in TOY_DATASETS:
        return ToyEvaluator(config, setup)
    from consistency_jax.metrics import image_eval  # images: sample grids and digits-FD

    return image_eval.ImageEvaluator(config, setup, example_shape)


# ----------------------------------------------------------------------------------------------------
# The loop


class _Writer:
    """metrics.jsonl + TensorBoard scalars (tensorboardX: event files without TensorFlow)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional
                logging.warning("tensorboardX is not installed: no TensorBoard scalars.")

    def scalars(self, step: int, values: dict, prefix: str) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def evaluation(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self.scalars(step, values, "eval")

    def close(self):
        if self.tb is not None:
            self.tb.close()


def check_finite(history: list[tuple[int, dict]],
                 before_raise: Optional[Callable[[], None]] = None) -> None:
    """Raises NonFiniteError naming the first step and quantity that is NaN or Inf; calls
    ``before_raise()`` first (the loop commits its pending, finite checkpoint there)."""
    for step, m in history:
        for name in ("loss", "grad_norm"):
            if not np.isfinite(m[name]):
                if before_raise is not None:
                    before_raise()
                raise NonFiniteError(f"Non-finite {name} ({m[name]}) at step {step}; the state of this "
                                     "step was not checkpointed. Lower the learning rate, enable "
                                     "config.optim.grad_clip, or set config.train.skip_nonfinite.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the configured model, evaluating and writing to ``workdir``; returns the final state."""
    setup = parse_config(config)
    mesh = sharding_lib.mesh_from_config(config)  # bad meshes / batch sizes fail before compiling
    sharding_lib.check_global_batch(config.data.batch_size, mesh)
    micro = int(config.train.get("microbatches", 1))
    if micro > 1:  # every device holds an equal part of every microbatch
        sharding_lib.check_global_batch(config.data.batch_size // micro, mesh,
                                        name="config.data.batch_size / config.train.microbatches")
    logging.info("%s", sharding_lib.describe(mesh))
    workdir = os.path.abspath(workdir)
    # Refuses a workdir holding checkpoints of another config (or none readable) before anything
    # is built, compiled or overwritten.
    checkpointer = ckpt_lib.Checkpointer.from_config(workdir, config)
    is_main = jax.process_index() == 0
    data_it, example_shape = build_data(config)
    teacher, teacher_params = build_teacher(config, setup)
    distance = build_distance(config, setup, example_shape)
    tx, lr_schedule = make_optimizer(config)

    rng = jax.random.key(config.seed)
    init_rng, step_rng, eval_rng = jax.random.split(rng, 3)
    _, apply_fn, params = build_model(config, example_shape, init_rng)
    loss_fn = build_loss(setup, apply_fn, distance, teacher)
    # A distance with weights (LPIPS) travels in the state: an input of the step, not a constant.
    weighted_distance = (distance if any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(distance))
                         else None)
    state = TrainState.create(params, tx, ema_rates=setup.ema_rates,
                              use_target=setup.method != "edm" and setup.curriculum.uses_target_ema,
                              teacher_params=teacher_params, distance=weighted_distance)
    # Replicated over "data"; θ, θ⁻, EMAs, optimizer state and the teacher split over "fsdp".
    state_shardings = sharding_lib.state_shardings(state, mesh, min_size=config.mesh.fsdp_min_size)
    state = sharding_lib.place(state, state_shardings)
    step_rng = sharding_lib.place(step_rng, sharding_lib.replicated(mesh))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("method=%s network=%s (%.3fM parameters) data=%s batch=%d steps=%d",
                 setup.method, config.model.name, n_params / 1e6, config.data.name,
                 config.data.batch_size, setup.num_steps)

    os.makedirs(workdir, exist_ok=True)
    evaluator = build_evaluator(config, setup, example_shape)
    writer = _Writer(workdir, is_main)
    step_fn = make_train_step(loss_fn, tx, setup.curriculum, lr_schedule=lr_schedule,
                              skip_nonfinite=config.train.skip_nonfinite, microbatches=micro)
    per_call = int(config.train.get("steps_per_call", 1))
    # in/out shardings, state donated; a scan of `per_call` steps per call when > 1.
    train_step = sharding_lib.jit_train_step(step_fn, mesh, state_shardings)
    multi_step = (train_step if per_call == 1 else
                  sharding_lib.jit_train_step(step_fn, mesh, state_shardings, steps_per_call=per_call))

    def run_eval(state):
        figures, samples = evaluator(apply_fn, eval_params(state, config), eval_rng)
        step = int(state.step)
        writer.evaluation(step, figures)
        if is_main:
            evaluator.plot(samples, os.path.join(workdir, f"samples_{step:08d}.png"),
                           f"{setup.method} step {step}")
        logging.info("eval step %d: %s", step,
                     " ".join(f"{k}={v:.4g}" for k, v in sorted(figures.items())))
        return figures

    # Resume: the newest readable checkpoint, restored into the live (sharded) state; the teacher
    # is re-attached, never read from the student's checkpoint. SIGTERM -> save and stop.
    restored = checkpointer.restore(state)
    if restored is not None:
        state, data_state = restored
        data_it.set_state(data_state)
    preemption = ckpt_lib.PreemptionWatcher(checkpointer)
    start = int(state.step)
    history: list[tuple[int, int, Any]] = []  # (first step, steps, device metrics)
    skipped = 0
    t_last, k_last = time.time(), start
    t_start = t_last
    k = start
    while k < setup.num_steps:
        # `per_call` steps in one call when aligned and enough remain, else one (a resumed run whose
        # step is not a multiple of per_call, or the tail of the run).
        n = per_call if k % per_call == 0 and k + per_call <= setup.num_steps else 1
        if n == 1:
            batch = sharding_lib.global_batch(next(data_it), mesh)  # this host's rows -> global
            state, metrics = train_step(state, batch, step_rng)
        else:
            local = [next(data_it) for _ in range(n)]
            stacked = jax.tree.map(lambda *rows: np.stack(rows), *local)
            state, metrics = multi_step(state, sharding_lib.global_batch(stacked, mesh, stacked=True),
                                        step_rng)
        history.append((k, n, metrics))
        k = done = k + n
        if done % config.train.log_every == 0 or done == setup.num_steps:
            fetched = _unstack_history(history)
            history = []
            if not config.train.skip_nonfinite:
                check_finite(fetched, before_raise=checkpointer.close)
            skipped += sum(int(m["finite"] == 0) for _, m in fetched)
            last = fetched[-1][1]
            now = time.time()
            rate = (done - k_last) / max(now - t_last, 1e-9)
            eta = (setup.num_steps - done) / max(rate, 1e-9)
            img_s = rate * config.data.batch_size
            logging.info("step %d/%d loss=%.5g grad_norm=%.3g N=%d mu=%.5f lr=%.3g | %.1f steps/s "
                         "%.0f img/s | ETA %s%s", done, setup.num_steps, last["loss"],
                         last["grad_norm"], last["num_scales"], last["mu"], last.get("lr", 0.0), rate,
                         img_s, _fmt_time(eta), f" | skipped {skipped}" if skipped else "")
            means = {k2: float(np.mean([m[k2] for _, m in fetched])) for k2 in last}
            writer.scalars(done, {**means, "steps_per_s": rate, "img_per_s": img_s,
                                  "skipped_steps": skipped}, "train")
            t_last, k_last = now, done
        preempted = preemption.reached(done, n)
        if checkpointer.should_save(done, final=done == setup.num_steps or preempted):
            if history and not config.train.skip_nonfinite:  # never checkpoint a broken state
                check_finite(_unstack_history(history), checkpointer.close)
            checkpointer.save(state, step=done, data_state=data_it.get_state(), config=config)
        if preempted:
            break
        if done % config.train.eval_every == 0 or done == setup.num_steps:
            run_eval(state)
    preemption.close()
    checkpointer.close()  # waits until the last checkpoint is committed
    if preemption.received:
        logging.info("Stopped by %s after step %d: checkpoint saved in %s; exiting cleanly.",
                     preemption.received, int(state.step), checkpointer.directory)
    else:
        logging.info("finished %d steps in %s", setup.num_steps, _fmt_time(time.time() - t_start))
    writer.close()
    return state


def _unstack_history(history: list[tuple[int, int, Any]]) -> list[tuple[int, dict]]:
    """(first step, steps, device metrics) entries -> host (step, metrics) pairs, one per step."""
    out = []
    for first, n, metrics in history:
        host = jax.device_get(metrics)
        if n == 1:
            out.append((first, host))
        else:
            out.extend((first + i, {key: value[i] for key, value in host.items()}) for i in range(n))
    return out


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
