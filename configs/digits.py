"""The default real-data job: scikit-learn's bundled 8×8 handwritten digits (1797 images, no download).

  python -m consistency_jax.main --config=configs/digits.py:method=ict --workdir=runs/digits_ict
  python -m consistency_jax.main --config=configs/digits.py:method=edm --workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=cd --workdir=runs/digits_cd \
      --config.teacher.workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=ct --workdir=runs/digits_ct

Continuous time (the *_cd ones add --config.teacher.workdir=runs/digits_edm; ect and scd take the EDM run
as their initialisation with --config.init.workdir=runs/digits_edm): method=sct, scd, ect,
cm_continuous_ct, cm_continuous_cd.
  python -m consistency_jax.main --config=configs/digits.py:method=ect --workdir=runs/digits_ect \
      --config.init.workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=scd --workdir=runs/digits_scd \
      --config.teacher.workdir=runs/digits_edm --config.init.workdir=runs/digits_edm

ECT tunes the EDM run's EMA (config.init.workdir, the same network); without it, it trains from
scratch.

A small DDPM++ (the NCSN++ code with positional embeddings and plain resampling) that trains on a CPU in
minutes; evaluation writes sample grids and digits-FD (Fréchet distance to the held-out digits in the
features of a fixed classifier, ``consistency_jax.metrics.digits``).
"""

from consistency_jax import config as common


def get_config(arg=None):
    args = common.parse_arg(arg, method="ict", size=8)
    method = args["method"]
    c = common.base_config()
    common.set_method(c, method)
    c.data.update(
        name="sklearn_digits",
        image_size=args["size"],
        num_channels=1,
        random_flip=False,
        use_labels=False,
        batch_size=64,
    )
    c.model.name = "ddpmpp"
    c.model.kwargs = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.optim.update(name="adam", lr=1e-3, warmup_steps=200, decay="cosine", grad_clip=1.0)
    c.train.update(num_steps=3000, log_every=250, eval_every=1500, ema_rates=(0.999,))
    c.checkpoint.every = 1000
    c.eval.num_samples = 1000
    c.eval.two_step_time = 0.5
    if method == "ict":
        c.curriculum.update(s0=10, s1=320)
    if method == "ct":
        # CM's CT curriculum is tuned for 800k steps: with s1 = 150 its target EMA (μ → 0.9986) barely
        # moves in a 3000-step run (digits-FD 870); s1 = 40 keeps μ ≤ 0.995 (digits-FD 56 / 47).
        c.loss.distance = "l2"
        c.curriculum.update(s0=2, s1=40, mu0=0.9)
    if method == "ect":
        # ECT (q = 2, k = 8, b = 1, c = 0, θ⁻ = sg θ) with a stage every 500 of the 3000 steps, so
        # Δt/t halves five times (stages 0–5). A smaller lr than training from scratch, as ECT tunes
        # with RAdam 1e-4 on CIFAR-10: 2e-4 here is a guess, not tuned on digits yet.
        c.ect.stage_steps = 500
        c.optim.update(lr=2e-4, warmup_steps=0)
    if method in ("sct", "scd"):
        # sCM's defaults (P_mean −1.0, P_std 1.4, c = 0.1, the weighting head). sCM's 10k warm-up is
        # for fine-tuning a diffusion model; from scratch half the run (1500 of 3000 steps) gave
        # digits-FD 26.9 / 24.1 (sCT) and 30.5 / 26.3 (sCD) against 30.4 / 27.3 and 31.1 / 28.2 with 500
        # (bench/RESULTS.md §6).
        c.loss.tangent_warmup = 1500
    if method == "scd":
        # The student is an EDM network (sigmas.trigflow_time = "edm"), so that it can start as its
        # teacher, as sCM fine-tunes a diffusion model: with --config.init.workdir=runs/digits_edm
        # (the teacher run) and a fine-tuning lr of 2e-4, 3000 steps gave digits-FD 18.0 / 16.2 and
        # 19.4 / 17.7 (seeds 0, 1: 1.14x and 1.24x the teacher's 14.28 at two steps; lr 1e-3: 1.23x,
        # 1.33x) against 30.5 / 26.3 from scratch (bench/RESULTS.md §6).
        c.sigmas.trigflow_time = "edm"
        c.optim.lr = 2e-4
    if method == "cd":
        # CM's CD (N = 18, Heun, μ = 0) with iCT's pseudo-Huber distance and λ = 1/Δt, which reached
        # the teacher's digits-FD far sooner than l2 / λ = 1 (bench/RESULTS.md §2).
        c.curriculum.update(num_scales=18, mu0=0.0)
        c.loss.update(distance="pseudo_huber", weighting="ict")
        c.train.update(num_steps=4000, eval_every=2000)
    return c
