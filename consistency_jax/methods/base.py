"""The contract between a training method and the generic train step, and the method registry.

A *method* (EDM denoiser training, consistency distillation, consistency training, ...) is one object
with a loss of the step and, if it keeps one, the update rule of its stop-gradient target θ⁻:

    method.loss(params, frozen, batch, rng, step) -> (loss, aux)
    method.update_target(target, params, step) -> target      (only if method.keeps_target)
    method.schedule(step) -> {name: scalar}                   (logged: N(k), μ(k), a warm-up, ...)

``frozen`` (``Frozen``) carries the trees the method reads but never differentiates — θ⁻ (or θ itself
under stop-gradient when no separate copy is kept), a teacher's φ, the weights of a learned distance
(LPIPS) — as declared by ``method.frozen_trees``. The method owns its schedule of the step (discrete
curricula N(k), μ(k); a continuous-time warm-up), so ``train.make_train_step`` needs nothing else and
stays generic over methods.

A *method plug-in* (``MethodSpec``) is the method's whole contract with the rest of the library: its
config block (fields and schema defaults), its paper defaults and per-data-set hyperparameters
(presets), its config checks (run before anything compiles), how to build the method object, whether
it needs a teacher, how its models are sampled (sampler family, consistency function, time grid), what
it adds to the network and which runs it may start from (its network kind). ``register`` adds one;
``consistency_jax.methods`` imports every module of its package, so a new method is one new file
(docs/adding_a_method.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax

from consistency_jax import parameterization as param_lib
from consistency_jax.train_state import ema_update

Array = jax.Array
PyTree = Any

# The trees a method may read without differentiating them.
FROZEN_TREES = ("target", "teacher", "distance")
# How a trained model is sampled: "consistency": f_θ in one or more steps (CM Algorithm 1);
# "denoiser": an EDM denoiser D_θ integrated by Heun's method (EDM Algorithm 1).
FAMILIES = ("consistency", "denoiser")


class Frozen(flax.struct.PyTreeNode):
    """The read-only inputs of a loss, all under stop-gradient.

    Attributes:
      target: θ⁻, the target parameters of a consistency loss (θ itself when the method keeps no
        separate copy: θ⁻ = stopgrad θ, as in iCT and CM's CD on CIFAR-10); None if not declared.
      teacher: a teacher's parameters φ (consistency distillation); None if not declared.
      distance: a distance with weights, a callable pytree such as ``metrics.lpips.LPIPSDistance``;
        None when the method's distance has no weights.
    """

    target: PyTree | None = None
    teacher: PyTree | None = None
    distance: PyTree | None = None


class Method:
    """Base class of training methods (see the module docstring for the contract).

    Subclasses set ``name`` and ``frozen_trees`` and implement ``loss``; a method with a separate
    target θ⁻ sets ``keeps_target`` and implements ``target_rate`` (the EMA rate μ(k) of
    ``update_target``'s default rule θ⁻ ← μ(k)·θ⁻ + (1 − μ(k))·θ, CM Eq. 8) or overrides
    ``update_target``.
    """

    name: str = ""
    frozen_trees: tuple[str, ...] = ()
    keeps_target: bool = False

    def loss(
        self, params: PyTree, frozen: Frozen, batch: Mapping[str, Array], rng: Array, step: Array
    ) -> tuple[Array, dict[str, Array]]:
        """The loss of one batch at optimizer step ``step`` (a traced int32), and scalars to log."""
        raise NotImplementedError

    def target_rate(self, step: Array) -> Array:
        """μ(k) of the target update (only called when ``keeps_target``)."""
        raise NotImplementedError(
            f"{type(self).__name__} keeps a target but defines no target_rate."
        )

    def update_target(self, target: PyTree, params: PyTree, step: Array) -> PyTree:
        """θ⁻ after the optimizer step ``step`` updated θ to ``params`` (CM Algorithms 2–3)."""
        return ema_update(target, params, self.target_rate(step))

    def schedule(self, step: Array) -> dict[str, Array]:
        """Step-dependent quantities to log (e.g. N(k) and μ(k)); traced, jittable."""
        return {}


def frozen_inputs(
    method: Method,
    params: PyTree,
    target: PyTree | None,
    teacher: PyTree | None,
    distance: PyTree | None,
) -> Frozen:
    """The ``Frozen`` a method declared: θ⁻ (or stopgrad θ without a separate copy), φ, weights."""
    wants = set(method.frozen_trees)
    if "target" in wants:
        target = params if target is None else target
    return Frozen(
        target=jax.lax.stop_gradient(target) if "target" in wants else None,
        teacher=jax.lax.stop_gradient(teacher) if "teacher" in wants else None,
        distance=distance if "distance" in wants else None,
    )


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What the library hands a plug-in's ``build``: everything already checked and built.

    Attributes:
      config: the validated run config.
      apply_fn: the raw network F(params, x, c_noise, *, labels, train, rng).
      sigmas: the noise configuration (``parameterization.SigmaConfig``).
      example_shape: one example's shape, e.g. (8, 8, 1).
      distance: d(a, b) -> (B,) when the method uses ``config.loss.distance``, else None.
      teacher: the teacher denoiser D_φ(φ, x, t, labels) when the plug-in needs one, else None.
    """

    config: Any
    apply_fn: Callable
    sigmas: Any
    example_shape: tuple[int, ...]
    distance: Callable | None = None
    teacher: Callable | None = None


def no_fields(c) -> None:
    """A method without config fields of its own."""


def no_grid(config) -> None:
    """A method whose models have no discrete time grid (continuous time)."""
    return None


def edm_network(config) -> str:
    """The network kind of the EDM and consistency preconditionings (CM Eq. 5–6, EDM Table 1)."""
    return "an EDM network"


@dataclasses.dataclass(frozen=True)
class NetworkAddition:
    """Parameters a method adds beside the network, e.g. sCM's log-variance head w_φ(t) (sCM §4.2).

    Attributes:
      field: the ``config.model`` flag that switches the addition on (stored with the run, so that a
        saved run's network is rebuilt from its config alone).
      wrap: net -> a module called exactly like ``net``, whose parameters are
        ``{inner: θ, ...the addition's own...}``.
      inner: where the wrapped network's parameters sit in the wrapper's tree. A ``config.init``
        source run without the addition starts the wrapper's ``inner`` from its θ and the rest fresh.
    """

    field: str
    wrap: Callable[[Any], Any]
    inner: str = "net"


@dataclasses.dataclass(frozen=True)
class TeacherSource:
    """A frozen ``teacher`` tree read as another run's evaluation parameters, as they are (no
    preconditioning around them), for a method whose teacher is not an EDM run at
    ``config.teacher.workdir`` (e.g. TCM's stage-1 consistency model). The library reads it
    (``build.build_teacher``, ``loading.load_model_params``): read-only, never checkpointed.

    Attributes:
      workdir: the config field naming the source run, e.g. "init.workdir".
      ema_rate: the config field naming which of its eval EMAs (0: its slowest).
      accepts: the source run's ``MethodSpec`` -> None when its models can serve, else why not
        (a sentence for the error naming ``workdir``).
    """

    workdir: str
    ema_rate: str
    accepts: Callable[[Any], str | None]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A training method as the config, the loop, evaluation and loading see it: its whole contract.

    Attributes:
      name: the value of ``config.method``.
      summary: one line for the README / error messages.
      family: how its models are sampled and evaluated, one of ``FAMILIES``.
      defaults: sets the method's paper defaults on a config (``methods.apply_preset``).
      check: validates the method's config fields before anything compiles; raises ValueError naming
        the field.
      build: (BuildContext) -> Method.
      fields: declares the method's config block on a config (fields and their schema defaults,
        ``methods.fields.declare``); every registered method's block makes the run-config schema
        (``methods.schema``), so ``config.base_config`` lists none of them.
      presets: data set name ("toy", "digits", "cifar10", "imagenet64", "lsun256", ...) -> a
        function ``(config, args)`` setting the method's hyperparameters for that data set (after
        ``defaults``; ``args`` are the config file's arguments, e.g. {"metric": "lpips"}). A data set
        missing here has no settings of this method (``methods.apply_preset`` refuses it).
      needs_teacher: the method reads a teacher (``config.teacher.workdir``).
      uses_distance: the method's loss uses ``config.loss.distance`` (so LPIPS weights are loaded).
      consistency_fn: the consistency function of the method's models at an EDM point (x_σ, σ), with
        the signature of ``parameterization.consistency_fn`` (the default, CM's f_θ; TrigFlow models
        give ``trigflow.consistency_fn_sigma``). Samplers and evaluators use it.
      grid_size: config -> the number of points of the model's final discrete time grid (for
        sampling times given as grid indices, CM's convention), or None in continuous time.
      network_kind: config -> what its network's parameters mean (e.g. "an EDM network"): a run
        may start from another run's parameters (``config.init``) only of the same kind.
      network_addition: what the method adds beside the network (``NetworkAddition``), or None.
      teacher: how a method that ``needs_teacher`` reads it, when its teacher is not an EDM run at
        ``config.teacher.workdir`` (``TeacherSource``; None: that EDM teacher, CM Algorithm 2).
      model_params: (config, params, teacher params) -> the parameters of the trained model as its
        ``consistency_fn`` reads them, when the model includes the frozen tree of its ``teacher``
        source (TCM's stage-1 model below t′); None: the parameters themselves. The loop's
        evaluation and the sampling command both go through it.
    """

    name: str
    summary: str
    family: str
    defaults: Callable[[Any], None]
    check: Callable[[Any], None]
    build: Callable[[BuildContext], Method]
    fields: Callable[[Any], None] = no_fields
    presets: Mapping[str, Callable[[Any, Mapping[str, Any]], None]] = dataclasses.field(
        default_factory=dict
    )
    needs_teacher: bool = False
    uses_distance: bool = True
    consistency_fn: Callable = param_lib.consistency_fn
    grid_size: Callable[[Any], int | None] = no_grid
    network_kind: Callable[[Any], str] = edm_network
    network_addition: NetworkAddition | None = None
    teacher: TeacherSource | None = None
    model_params: Callable[[Any, PyTree, PyTree], PyTree] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"Method {self.name!r}: unknown family {self.family!r}; one of {FAMILIES}."
            )


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Adds a method plug-in; a second registration of a name replaces the first (reloads)."""
    if not spec.name or not spec.name.replace("_", "").isalnum():
        raise ValueError(f"A method name must be a non-empty identifier, got {spec.name!r}.")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, MethodSpec]:
    return dict(_REGISTRY)
