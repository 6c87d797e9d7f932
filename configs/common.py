"""Blocks shared by every config. Config files call ``base_config()`` and ``set_method(...)`` and then
override only what differs (REFERENCE §4 and §7 give the paper's values)."""
from __future__ import annotations

import ml_collections

METHODS = ("cd", "ct", "ict", "edm")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "ct"
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

    c.loss = ml_collections.ConfigDict()
    c.loss.distance = "l2"
    c.loss.weighting = "uniform"
    c.loss.index_sampling = "uniform"
    c.loss.solver = "heun"
    c.loss.huber_c = ml_collections.FieldReference(None, field_type=float)
    c.loss.lpips_weights = ""  # .safetensors file for distance = lpips
    c.loss.lpips_net = "vgg"

    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.kind = "constant"
    c.curriculum.num_scales = 18
    c.curriculum.mu0 = 0.0
    c.curriculum.s0 = 2
    c.curriculum.s1 = 150
    c.curriculum.mu_form = "code"  # "code": what jcm/cm ran (μ(0) = 0.81); "paper": the paper's form
    c.curriculum.total_steps = 0  # K; 0 -> train.num_steps

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

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 10_000
    c.train.log_every = 500
    c.train.eval_every = 5_000
    c.train.ema_rates = (0.999,)
    c.train.skip_nonfinite = False
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
    # Or the official code's grid indices counted from T, e.g. (0, 22, 39) on the N = 40 grid; the grid's
    # N is the curriculum's final one. Empty: use two_step_time.
    c.eval.two_step_indices = ()
    c.eval.edm_steps = 18  # EDM Heun steps for teachers (18 -> 35 NFE)

    # Device mesh ("data", "fsdp"), see consistency_jax/sharding.py. data × fsdp = number of devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel devices; -1: all devices not used by fsdp
    c.mesh.fsdp = 1  # shard θ, θ⁻, EMAs, optimizer state (and a teacher) over this many devices
    c.mesh.fsdp_min_size = 0  # leaves with fewer elements stay replicated under fsdp

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 5_000
    c.checkpoint.keep = 3
    c.checkpoint.keep_every = 0  # also keep every M-th step forever; 0 disables
    c.checkpoint.override_config = False  # resume even if the workdir's config differs
    return c


def set_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Sets the loss and curriculum blocks of a method to the paper's defaults (REFERENCE §3–4).

    cd: CM's distillation (N = 18, Heun, μ = 0); ct: CM's CT (adaptive N and μ, s0 = 2, s1 = 150,
    μ0 = 0.9, the official code's μ); ict: iCT (doubling N from 10 to 1280, μ = 0, pseudo-Huber,
    λ = 1/Δt, lognormal n); edm: an EDM teacher.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    c.method = method
    if method == "cd":
        c.curriculum.update(kind="constant", num_scales=18, mu0=0.0)
        c.loss.update(solver="heun", weighting="uniform", index_sampling="uniform")
    elif method == "ct":
        c.curriculum.update(kind="cm", s0=2, s1=150, mu0=0.9, mu_form="code")
        c.loss.update(weighting="uniform", index_sampling="uniform")
    elif method == "ict":
        c.curriculum.update(kind="ict", s0=10, s1=1280, mu0=0.0)
        c.loss.update(distance="pseudo_huber", weighting="ict", index_sampling="lognormal")
    return c


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parses "method=ct,foo=1" config-file arguments into a dict over ``defaults``."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"Config arguments are key=value pairs separated by commas, got {item!r}.")
        k, v = item.split("=", 1)
        if k not in out:
            raise ValueError(f"Unknown config argument {k!r}; known: {sorted(out)}.")
        out[k] = type(out[k])(v) if out[k] is not None else v
    return out


# ----------------------------------------------------------------------------------------------------
# Image blocks shared by the paper configs (REFERENCE §7)


def ncsnpp_cifar10(dropout: float = 0.0) -> dict:
    """NCSN++ as in jcm's CIFAR-10 configs (REFERENCE §7 footnote 1; about 56M parameters)."""
    return dict(nf=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=dropout,
                fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True, progressive_input="residual",
                progressive_combine="sum", embedding_type="fourier", fourier_scale=16.0,
                init_scale=0.0)


def adm_imagenet64(dropout: float = 0.0) -> dict:
    """Class-conditional ADM UNet of cm's ImageNet 64 runs (REFERENCE §7 footnote 2)."""
    return dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                attention_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
                use_scale_shift_norm=True, dropout=dropout, num_classes=1000)


def adm_lsun256(dropout: float = 0.0) -> dict:
    """Unconditional ADM UNet of cm's LSUN 256 runs (REFERENCE §7 footnote 3)."""
    return dict(model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
                use_scale_shift_norm=False, dropout=dropout, num_classes=None)


def image_data(c: ml_collections.ConfigDict, name: str, image_size: int, num_channels: int = 3, *,
               random_flip: bool = True, use_labels: bool = False, batch_size: int = 512):
    c.data.update(name=name, image_size=image_size, num_channels=num_channels,
                  random_flip=random_flip, use_labels=use_labels, batch_size=batch_size)
    c.eval.num_samples = 64  # a sample grid; FID/IS/KID runs are separate jobs
    return c


def paper_schedule(c: ml_collections.ConfigDict, *, optimizer: str, lr: float, num_steps: int,
                   ema_rates, warmup_steps: int = 0):
    c.optim.update(name=optimizer, lr=lr, warmup_steps=warmup_steps, decay="constant")
    c.train.update(num_steps=num_steps, ema_rates=tuple(ema_rates), log_every=100, eval_every=10_000)
    c.checkpoint.update(every=10_000, keep=3, keep_every=100_000)
    return c
