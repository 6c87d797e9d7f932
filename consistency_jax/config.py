"""Run configs: the base config and its shared blocks, config-file loading, and the one validation.

Config files (the paper settings in the repository's top-level ``configs/``, or a user's own) build an
``ml_collections.ConfigDict`` from ``base_config()``, set a method's paper defaults with
``set_method`` and override what differs. ``validate(config)`` is the single place where every field is
checked, with the field named, before anything is compiled or written; it returns the typed pieces the
loop needs (``Setup``). Method-specific fields are checked by the method's plug-in
(``methods.MethodSpec.check``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from consistency_jax.toy_data import TOY_DATASETS

DIGITS_DATASET = "sklearn_digits"
READERS = ("auto", "data_source", "tfds_load")
OPTIMIZERS = ("adam", "radam")
LR_DECAYS = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
# Leaves with fewer elements than this stay replicated under fsdp: splitting a bias or a norm scale
# saves nothing and costs an all-gather per use (64 KiB of float32).
DEFAULT_FSDP_MIN_SIZE = 1 << 14


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run config, with its default."""
    c = ml_collections.ConfigDict()
    c.method = "ct"  # a registered method: consistency_jax.methods.names()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "toy_ring"  # toy_ring | sklearn_digits | any tfds image dataset name
    c.data.data_dir = ""  # "" -> ~/tensorflow_datasets (or the tfds default)
    c.data.image_size = 0  # 0 for vector data
    c.data.num_channels = 0
    c.data.random_flip = False
    c.data.use_labels = False
    c.data.batch_size = 256  # global batch over all hosts and devices
    # auto: array_record -> tfds.data_source + grain (no TensorFlow); tfrecord -> tfds.load (TF).
    c.data.reader = "auto"  # auto | data_source | tfds_load
    c.data.shuffle_buffer = 0  # tfds_load only: records in the shuffle buffer; 0: the host's share

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict()  # constructor arguments of the network
    c.model.dtype = "float32"  # compute dtype of activations: float32 | bfloat16
    # A learned log-variance head w_φ(t) beside the network (sCM's adaptive weighting; set by sct/scd).
    c.model.logvar_head = False

    c.sigmas = ml_collections.ConfigDict()
    c.sigmas.sigma_min = 0.002
    c.sigmas.sigma_max = 80.0
    c.sigmas.sigma_data = 0.5
    c.sigmas.rho = 7.0
    c.sigmas.c_noise = "jcm"
    # TrigFlow methods (sct, scd): the network sees the angle t ("angle", sCM) or is an EDM network
    # ("edm": c_noise(σ_d·tan t), output −F; an EDM run is then an exact start, config.init).
    c.sigmas.trigflow_time = "angle"

    c.loss = ml_collections.ConfigDict()
    c.loss.distance = "l2"
    c.loss.weighting = "uniform"
    c.loss.index_sampling = "uniform"
    c.loss.solver = "heun"
    c.loss.huber_c = ml_collections.FieldReference(None, field_type=float)
    c.loss.p_mean = -1.1  # iCT's lognormal choice of n (index_sampling = lognormal)
    c.loss.p_std = 2.0
    c.loss.edm_p_mean = -1.2  # EDM's training distribution ln σ ~ N(edm_p_mean, edm_p_std²)
    c.loss.edm_p_std = 1.2
    c.loss.stopgrad = True  # continuous-time CM: the pseudo-objective of CM Thm. 6 (False: ‖df/dt‖)
    # sCM (sct / scd): the tangent warm-up r = min(1, step / tangent_warmup) and the normalisation
    # g / (‖g‖ + tangent_c); its proposal of the noise level is ln σ ~ N(p_mean, p_std²).
    c.loss.tangent_warmup = 10_000
    c.loss.tangent_c = 0.1
    c.loss.lpips_weights = ""  # .safetensors file for distance = lpips
    c.loss.lpips_net = "vgg"

    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.kind = "constant"
    c.curriculum.num_scales = 18
    c.curriculum.mu0 = 0.0
    c.curriculum.s0 = 2
    c.curriculum.s1 = 150
    c.curriculum.mu_form = (
        "code"  # "code": what jcm/cm ran (μ(0) = 0.81); "paper": the paper's form
    )
    c.curriculum.total_steps = 0  # K; 0 -> train.num_steps

    # ECT (methods/ect.py; Geng et al. 2024): pairs (t, r) with ln t ~ N(p_mean, p_std²) and
    # r = max(0, t − Δt), Δt = t·q^{−(s+1)}·(1 + k·sigmoid(−b·t)) at stage s = ⌊step / stage_steps⌋;
    # pseudo-Huber d with c = huber_c (0: the l2 norm ‖a − b‖), weight 1/(t − r). The method's
    # defaults are ECT's CIFAR-10 values (set again by set_method).
    c.ect = ml_collections.ConfigDict()
    c.ect.q = 2.0  # Δt/t is divided by q every stage (4 on ImageNet 64)
    c.ect.k = 8.0
    c.ect.b = 1.0
    c.ect.stage_steps = 25_000  # optimizer steps per stage (25k at batch 128 on CIFAR-10)
    c.ect.p_mean = -1.1
    c.ect.p_std = 2.0
    c.ect.huber_c = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "radam"  # adam | radam
    c.optim.lr = 4e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"  # constant | cosine
    c.optim.grad_clip = 0.0  # global-norm clip; 0 disables

    c.teacher = ml_collections.ConfigDict()
    c.teacher.workdir = ""  # CD: the EDM teacher's workdir (read-only); "exact" on the toy
    c.teacher.ema_rate = 0.0  # which of the teacher's EMAs to use; 0 -> its slowest

    # Start θ (and θ⁻ and every eval EMA) from another run's eval EMA instead of a random init, for
    # any method (ECT tunes a pretrained EDM denoiser). Read only when the run starts fresh; a run
    # that resumes from its own checkpoint ignores it. The source's network must be this run's
    # (config.model up to kwargs.dropout and dtype, which change no parameter; sigmas.sigma_data
    # and sigmas.c_noise; the same parameter shapes).
    c.init = ml_collections.ConfigDict()
    c.init.workdir = ""  # the source run's workdir (read-only); "" -> random initialisation
    c.init.ema_rate = 0.0  # which of its eval EMAs; 0 -> its slowest (θ if it kept none)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 10_000
    c.train.log_every = 500
    c.train.eval_every = 5_000
    c.train.ema_rates = (0.999,)
    c.train.skip_nonfinite = False
    # With skip_nonfinite: stop the run with an error after this many skipped steps in a row (0: no
    # limit), or when more than this fraction of the steps run by this process were skipped (checked
    # from 100 steps on and at the end; 1.0: no limit).
    c.train.max_consecutive_skips = 100
    c.train.max_skip_fraction = 0.25
    # Train steps per compiled call (a lax.scan; the run is the same for any value). > 1 saves host
    # dispatch on GPU/TPU for small networks; keep 1 on CPU. log/eval/checkpoint cadences must be
    # multiples of it.
    c.train.steps_per_call = 1
    # Gradient accumulation: the batch is split into this many microbatches whose gradients are
    # summed in a scan (same update size, the activation memory of one microbatch; the noise draws
    # differ from an unsplit batch). batch_size must be a multiple of microbatches × devices.
    c.train.microbatches = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 2000
    c.eval.ema_rate = 0.0  # 0 -> the slowest eval EMA
    c.eval.two_step_time = 0.8  # τ_1 of 2-step sampling (CM Algorithm 1)
    # Or the official code's grid indices counted from T, e.g. (0, 22, 39) on the N = 40 grid; the
    # grid's N is the curriculum's final one. Empty: use two_step_time.
    c.eval.two_step_indices = ()
    c.eval.edm_steps = 18  # EDM Heun steps for teachers (18 -> 35 NFE)
    # FID / IS of every evaluation's samples (image runs): the FID Inception weights (.safetensors,
    # README "Evaluating like the papers"); empty: none. The reference: a statistics / reference-batch
    # .npz, or empty for the whole train split of config.data.name (computed once, cached).
    c.eval.inception_weights = ""
    c.eval.fid_reference = ""
    c.eval.fid_metrics = ("fid", "is")

    # Device mesh ("data", "fsdp"), see consistency_jax/sharding.py. data × fsdp = number of devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel devices; -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # shard θ, θ⁻, EMAs, optimizer state (and a teacher) over this many devices
    c.mesh.fsdp_min_size = DEFAULT_FSDP_MIN_SIZE  # smaller leaves stay replicated under fsdp

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 5_000
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 0  # also keep every M-th step forever; 0 disables
    c.checkpoint.override_config = False  # resume even if the workdir's config differs
    return c


def set_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Sets ``c.method`` and the method's paper defaults (its plug-in's ``defaults``)."""
    from consistency_jax import methods

    methods.get(method).defaults(c)
    c.method = method
    return c


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_arg(arg: str | None, **defaults: Any) -> dict:
    """Parses "method=ct,size=16" config-file arguments into a dict over ``defaults``.

    A value takes the type of its default: int, float, str, or bool ("true"/"false", "1"/"0",
    "yes"/"no", any case).

    Raises:
      ValueError: an unknown key, a missing "=", or a value that is not of the default's type.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(
                f"Config arguments are key=value pairs separated by commas, got {item!r}."
            )
        k, v = item.split("=", 1)
        if k not in out:
            raise ValueError(f"Unknown config argument {k!r}; known: {sorted(out)}.")
        kind = type(out[k])
        if out[k] is None or kind is str:
            out[k] = v
        elif kind is bool:
            if v.lower() not in _TRUE + _FALSE:
                raise ValueError(f"Config argument {k}={v!r} is not a boolean (true/false).")
            out[k] = v.lower() in _TRUE
        else:
            try:
                out[k] = kind(v)
            except ValueError:
                raise ValueError(f"Config argument {k}={v!r} is not a {kind.__name__}.") from None
    return out


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Runs ``get_config(arg)`` of a config file given by path ("configs/toy.py" or
    "configs/toy.py:method=ct"), without putting anything on ``sys.path``.

    Raises:
      ValueError: the file does not exist or has no ``get_config``.
    """
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ValueError(f"No config file {path!r}.")
    name = "consistency_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"The config file {path} defines no get_config().")
    return module.get_config(arg) if arg is not None else module.get_config()


# ----------------------------------------------------------------------------------------------------
# Blocks shared by the paper configs (CM Appendix C; iCT §4)


def ncsnpp_cifar10(dropout: float = 0.0) -> dict:
    """NCSN++ as in jcm's CIFAR-10 configs (CM Appendix C; about 56M parameters)."""
    return dict(
        nf=128,
        ch_mult=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=dropout,
        fir=True,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        progressive_input="residual",
        progressive_combine="sum",
        embedding_type="fourier",
        fourier_scale=16.0,
        init_scale=0.0,
    )


def adm_imagenet64(dropout: float = 0.0) -> dict:
    """Class-conditional ADM UNet of cm's ImageNet 64 runs (CM Appendix C)."""
    return dict(
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=True,
        dropout=dropout,
        num_classes=1000,
    )


def adm_lsun256(dropout: float = 0.0) -> dict:
    """Unconditional ADM UNet of cm's LSUN 256 runs (CM Appendix C)."""
    return dict(
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
        use_scale_shift_norm=False,
        dropout=dropout,
        num_classes=None,
    )


def image_data(
    c: ml_collections.ConfigDict,
    name: str,
    image_size: int,
    num_channels: int = 3,
    *,
    random_flip: bool = True,
    use_labels: bool = False,
    batch_size: int = 512,
):
    c.data.update(
        name=name,
        image_size=image_size,
        num_channels=num_channels,
        random_flip=random_flip,
        use_labels=use_labels,
        batch_size=batch_size,
    )
    c.eval.num_samples = 64  # a sample grid; FID/IS/KID runs are separate jobs
    return c


def paper_schedule(
    c: ml_collections.ConfigDict,
    *,
    optimizer: str,
    lr: float,
    num_steps: int,
    ema_rates,
    warmup_steps: int = 0,
):
    c.optim.update(name=optimizer, lr=lr, warmup_steps=warmup_steps, decay="constant")
    c.train.update(
        num_steps=num_steps, ema_rates=tuple(ema_rates), log_every=100, eval_every=10_000
    )
    c.checkpoint.update(every=10_000, keep=3, keep_every=100_000)
    return c


# ----------------------------------------------------------------------------------------------------
# Validation


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


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config.{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _check_dataset_name(name: str) -> None:
    """toy_ring, sklearn_digits/<size>, or a TFDS name (checked against the TFDS registry, which
    works offline; whether the data is prepared is the data layer's business)."""
    if not name:
        raise ValueError("config.data.name is empty.")
    if name in TOY_DATASETS or name.split("/")[0] == DIGITS_DATASET or ":" in name:
        return  # community data sets ("namespace:name") are left to TFDS
    import tensorflow_datasets as tfds  # only for image data

    try:
        tfds.builder_cls(name.split("/")[0])
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"Unknown data set {name!r} (config.data.name): not one of {TOY_DATASETS}, "
            f"'{DIGITS_DATASET}/<size>', nor a TFDS data set name."
        ) from None


def _check_network_input(config: ml_collections.ConfigDict) -> None:
    """Traces (jax.eval_shape, nothing is compiled) the network's init on the configured data shape,
    so that kwargs the network does not take, or an image size it cannot down-sample, fail here."""
    import jax

    from consistency_jax import build

    if config.data.name in TOY_DATASETS:
        shape, what = (2,), "2-D toy points"
    elif config.data.image_size > 0 and config.data.num_channels > 0:
        s, ch = config.data.image_size, config.data.num_channels
        shape, what = (s, s, ch), f"{s}x{s}x{ch} images (config.data.image_size/num_channels)"
    else:
        return  # the data layer knows the shape
    try:
        _, _, init = build.build_network(config, shape)  # the init the run will use
        jax.eval_shape(init, jax.random.key(0))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"The network {config.model.name!r} (config.model) cannot take {what}: {e}"
        ) from e


def _check_optimizer(o) -> None:
    if o.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {o.name!r} (config.optim.name); one of {OPTIMIZERS}.")
    if not o.lr > 0:
        raise ValueError(f"config.optim.lr must be positive, got {o.lr}.")
    if o.decay not in LR_DECAYS:
        raise ValueError(f"Unknown lr decay {o.decay!r} (config.optim.decay); one of {LR_DECAYS}.")
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


def _check_lpips(config, spec) -> None:
    """LPIPS weights are read when the run is built: their file and net are checked here first."""
    lc = config.loss
    if not (spec.uses_distance and lc.distance == "lpips"):
        return
    if lc.lpips_net not in ("vgg", "alex"):
        raise ValueError(f"config.loss.lpips_net must be 'vgg' or 'alex', got {lc.lpips_net!r}.")
    if not lc.lpips_weights or not os.path.isfile(lc.lpips_weights):
        raise ValueError(
            f"config.loss.distance='lpips' needs config.loss.lpips_weights, a .safetensors "
            f"file made by tools/convert_lpips_weights.py; got {lc.lpips_weights!r}"
            f"{' (no such file)' if lc.lpips_weights else ''}."
        )


def _check_teacher(config, spec) -> None:
    if not spec.needs_teacher:
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
        return
    loading.teacher_config(workdir)  # a denoiser run with a readable checkpoint (JSON only)


# Fields of config.model that change no parameter: a run may start from a run that differs there.
INIT_FREE_MODEL_FIELDS = ("model.kwargs.dropout", "model.dtype")
# Fields outside config.model that fix what the network's inputs mean.
INIT_NETWORK_FIELDS = ("sigmas.sigma_data", "sigmas.c_noise")


def network_kind(config) -> str:
    """What a run's network parameters mean, for ``config.init``: "an EDM network" (the consistency
    and EDM preconditionings; a TrigFlow method with sigmas.trigflow_time=edm) or "a TrigFlow network
    seeing the angle t" (sct/scd by default)."""
    from consistency_jax import methods as methods_lib
    from consistency_jax import trigflow

    spec = methods_lib.get(config.method)
    if (
        spec.consistency_fn is trigflow.consistency_fn_sigma
        and config.sigmas.get("trigflow_time", "angle") != "edm"
    ):
        return "a TrigFlow network seeing the angle t (sigmas.trigflow_time=angle)"
    return "an EDM network"


def _check_init(config) -> None:
    """``config.init``: the source run holds a readable checkpoint of the same network (its config
    and its parameters' shapes and dtypes are read; no array is loaded, nothing compiled)."""
    import jax

    from consistency_jax import build, checkpoint, loading
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
    # sCM's weighting head may be new here (it starts fresh; the source's θ becomes the "net" part).
    fresh_head = build.init_adds_logvar_head(source, config)
    free = INIT_FREE_MODEL_FIELDS + (("model.logvar_head",) if fresh_head else ())
    diffs = [
        f"{k}: {theirs!r} -> {mine!r}"
        for k, theirs, mine in checkpoint.differing_fields(
            checkpoint.config_to_dict(source),
            checkpoint.config_to_dict(config),
            ignore_resumable=False,
            defaults=default_values(),
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
    if config.data.name in TOY_DATASETS:
        shape = (2,)
    elif config.data.image_size > 0 and config.data.num_channels > 0:
        s = config.data.image_size
        shape = (s, s, config.data.num_channels)
    else:
        return  # the shape comparison needs the data shape; the restore checks it when loading
    _, _, init = build.build_network(config, shape)
    want = jax.eval_shape(init, jax.random.key(0))
    if fresh_head:
        want = want["net"]
    describe = lambda tree: {
        jax.tree_util.keystr(p): (tuple(a.shape), str(a.dtype))
        for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    got, need = describe(abstract), describe(want)
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


def _check_eval(config, sigmas, spec, rates) -> None:
    e = config.eval
    _positive_int(e.num_samples, "eval.num_samples")
    _positive_int(e.edm_steps, "eval.edm_steps")
    if e.ema_rate and float(e.ema_rate) not in rates:
        raise ValueError(
            f"config.eval.ema_rate={e.ema_rate} is not one of the EMA rates kept "
            f"(config.train.ema_rates={rates}); 0 picks the slowest."
        )
    if e.get("inception_weights"):
        if config.data.name in TOY_DATASETS:
            raise ValueError("config.eval.inception_weights is for image runs, not the 2-D toy.")
        if not os.path.isfile(e.inception_weights):
            raise ValueError(
                f"config.eval.inception_weights={e.inception_weights!r} is not a file; make it "
                "with tools/convert_inception_weights.py (README, 'Evaluating like the papers')."
            )
        if e.fid_reference and not os.path.isfile(e.fid_reference):
            raise ValueError(
                f"config.eval.fid_reference={e.fid_reference!r} is not a file (a statistics "
                "or reference-batch .npz; empty: the train split of config.data.name)."
            )
        from consistency_jax.evaluation.inception_metrics import METRICS

        bad = sorted(set(e.fid_metrics) - set(METRICS))
        if bad or not e.fid_metrics:
            raise ValueError(
                f"config.eval.fid_metrics={tuple(e.fid_metrics)}: choose from {METRICS}."
            )
    if spec.family != "consistency":
        return
    from consistency_jax.evaluation import samples

    try:
        samples.two_step_times(config, sigmas)
    except ValueError as e_:
        raise ValueError(f"config.eval.two_step_time / two_step_indices: {e_}") from e_


def validate(config: ml_collections.ConfigDict) -> Setup:
    """Checks every field of a run config, before anything is compiled or written.

    Returns:
      the typed pieces (``Setup``), including the device mesh.

    Raises:
      ValueError: naming the first bad field (``checkpoint.CheckpointError``, a ValueError, for a
        CD teacher directory that holds no usable run).
    """
    from consistency_jax import checkpoint, methods, networks, parameterization, sharding
    from consistency_jax.train_state import check_ema_rate

    spec = methods.get(config.method)
    if config.model.name not in networks.network_names():
        raise ValueError(
            f"Unknown network {config.model.name!r} (config.model.name); "
            f"known networks: {', '.join(networks.network_names())}."
        )
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {DTYPES}, got {config.model.dtype!r}.")
    t = config.train
    num_steps = _positive_int(t.num_steps, "train.num_steps")
    for name in ("log_every", "eval_every"):
        _positive_int(t[name], f"train.{name}")
    _positive_int(t.get("max_consecutive_skips", 0), "train.max_consecutive_skips", minimum=0)
    fraction = t.get("max_skip_fraction", 1.0)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(
            f"config.train.max_skip_fraction must lie in (0, 1] (1: no limit), got {fraction!r}."
        )
    micro = _positive_int(t.get("microbatches", 1), "train.microbatches")
    per_call = _positive_int(t.get("steps_per_call", 1), "train.steps_per_call")
    c = config.checkpoint
    checkpoint.check_cadence(c.every, c.keep, c.keep_every)
    for name, every in (
        ("train.log_every", t.log_every),
        ("train.eval_every", t.eval_every),
        ("checkpoint.every", c.every),
    ):
        if every % per_call:
            raise ValueError(
                f"config.{name}={every} is not a multiple of config.train.steps_per_call="
                f"{per_call}: the loop only sees every steps_per_call-th step."
            )
    _check_optimizer(config.optim)
    rates = tuple(check_ema_rate(r, "Every EMA rate (config.train.ema_rates)") for r in t.ema_rates)
    check_ema_rate(config.teacher.ema_rate, "config.teacher.ema_rate")
    _check_dataset_name(config.data.name)
    if config.data.get("reader", "auto") not in READERS:
        raise ValueError(
            f"config.data.reader must be one of {READERS}, got {config.data.reader!r}."
        )
    _positive_int(config.data.get("shuffle_buffer", 0), "data.shuffle_buffer", minimum=0)
    try:
        sigmas = parameterization.SigmaConfig(**config.sigmas.to_dict())
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.sigmas: {e}") from e
    spec.check(config)
    _check_lpips(config, spec)
    _check_eval(config, sigmas, spec, rates)
    _positive_int(config.mesh.fsdp_min_size, "mesh.fsdp_min_size", minimum=0)
    mesh = sharding.mesh_from_config(config)
    _positive_int(config.data.batch_size, "data.batch_size")
    sharding.check_global_batch(config.data.batch_size, mesh)
    if config.data.batch_size % micro:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} does not split into "
            f"config.train.microbatches={micro} equal microbatches."
        )
    if micro > 1:  # every device holds an equal part of every microbatch
        sharding.check_global_batch(
            config.data.batch_size // micro,
            mesh,
            name="config.data.batch_size / config.train.microbatches",
        )
    _check_network_input(config)
    _check_teacher(config, spec)
    _check_init(config)
    return Setup(
        spec=spec,
        sigmas=sigmas,
        ema_rates=rates,
        num_steps=num_steps,
        mesh=mesh,
        microbatches=micro,
        steps_per_call=per_call,
    )


def default_values() -> dict[str, Any]:
    """``base_config()`` as a JSON dict (the form a checkpoint stores a config in), for comparing the
    config of a checkpoint written before a field existed (``checkpoint.config_differences``)."""
    import json

    return json.loads(base_config().to_json_best_effort(sort_keys=True))
