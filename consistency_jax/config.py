"""Run configs as data: the base config (the blocks every run has), config-file loading and argument
parsing, and the blocks shared by the paper configs. Nothing here imports the rest of the package.

Config files (the paper settings in the repository's top-level ``configs/``, or a user's own) build an
``ml_collections.ConfigDict`` from ``base_config()``, set the data set, network and budget, and make it
a run of a method with ``methods.apply_preset(c, method, dataset)``, which adds every method's config
block (``MethodSpec.fields``), the method's paper defaults and its settings for that data set
(``MethodSpec.presets``). ``build.validate(config)`` checks every field before anything is compiled or
written: each builder checks its own slice (data, network, method, optimizer, checkpoint, teacher,
evaluation), naming the field.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

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

    c.sigmas = ml_collections.ConfigDict()
    c.sigmas.sigma_min = 0.002
    c.sigmas.sigma_max = 80.0
    c.sigmas.sigma_data = 0.5
    c.sigmas.rho = 7.0
    c.sigmas.c_noise = "jcm"

    # A method's own fields (config.loss, config.curriculum, config.ect, ...) are declared by the
    # method (``MethodSpec.fields``) and added by ``methods.apply_preset`` / ``methods.schema``.

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
    # ω of the classifier-free guided teacher ω·D(x|c) + (1 − ω)·D(x|∅) (1: the teacher itself); a
    # class-conditional teacher trained with label dropout (loss.edm_class_dropout > 0).
    c.teacher.guidance = 1.0

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
    # Stop a run (before checkpointing it) whose parameter or update norm jumps beyond this factor
    # of its running average: a finite but diverged state (0: no check).
    c.train.max_norm_jump = 100.0
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


# cm's ImageNet 64 and LSUN 256 EMA rates (its launch scripts; CM Appendix C).
CM_IMAGENET64_EMAS = (0.999, 0.9999, 0.9999432189950708)
CM_LSUN256_EMAS = (0.9999, 0.99994, 0.9999432189950708)


# ----------------------------------------------------------------------------------------------------
# Field names


def field_paths(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of ``c`` as a dotted path ("train.num_steps"), blocks included ("train")."""
    out = []
    for k in c.keys():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(c[k], ml_collections.ConfigDict):
            out.extend(field_paths(c[k], path + "."))
    return out


def unknown_field(c: ml_collections.ConfigDict, path: str) -> str | None:
    """None when ``path`` ("train.num_steps") names a field of ``c``; else an error message naming
    the field, the nearest known ones and the fields of its block."""
    known = field_paths(c)
    if path in known:
        return None
    parent, _, name = path.rpartition(".")
    if parent and parent not in known:  # the block itself is unknown: name it
        return unknown_field(c, parent)
    names = sorted(p.rpartition(".")[2] for p in known if p.rpartition(".")[0] == parent)
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    where = f"config.{parent}" if parent else "the config"
    full = lambda n: f"config.{parent}.{n}" if parent else f"config.{n}"
    hint = f"; did you mean {' or '.join(full(n) for n in near)}?" if near else ""
    return (
        f"Unknown config field config.{path}: {where} has no field {name!r}{hint} "
        f"({where} has: {', '.join(names)})."
    )


# Fields naming another run that this run reads (a CD teacher, the run θ starts from). They are
# stored absolute, so that resuming or sampling a run works from any working directory.
SOURCE_RUN_FIELDS = ("teacher.workdir", "init.workdir")


def with_absolute_sources(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``SOURCE_RUN_FIELDS`` given as relative local paths made absolute (at the
    current working directory); ``""``, ``"exact"`` and URLs stay. A copy when anything changes."""
    changes = {}
    for field in SOURCE_RUN_FIELDS:
        block, name = field.split(".")
        value = config[block][name] if block in config and name in config[block] else ""
        absolute = absolute_source(value)
        if absolute != value:
            changes[(block, name)] = absolute
    if not changes:
        return config
    config = copy.deepcopy(config)
    for (block, name), value in changes.items():
        config[block][name] = value
    return config


def absolute_source(value: Any) -> Any:
    """One ``SOURCE_RUN_FIELDS`` value as ``with_absolute_sources`` stores it."""
    if not isinstance(value, str) or not value or value == "exact" or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))
