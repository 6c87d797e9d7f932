"""The converter of the released PyTorch consistency models (``consistency_jax.convert``).

The fixtures (tools/make_cm_fixture.py) hold two tiny ADM UNets of the official cm code with random
weights and the official network's outputs on fixed inputs; no torch is needed here.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from consistency_jax import convert, loading, samplers
from consistency_jax import parameterization as param_lib
from consistency_jax.networks import make_apply_fn
from consistency_jax.networks.unet import ADMUNet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA_MIN, SIGMA_DATA, T = 0.002, 0.5, 80.0

# The fixtures' architectures in the converter's terms (attention resolutions in pixels).
ARCH = {
    "cond": dict(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 1),
        num_res_blocks=1,
        attention_resolutions=(16, 8),
        num_head_channels=16,
        num_classes=10,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
    "uncond": dict(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 1),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=-1,
        num_heads=2,
        num_classes=None,
        resblock_updown=False,
        use_scale_shift_norm=False,
    ),
}


def _fixture(name):
    weights = os.path.join(FIXTURES, f"cm_unet_{name}.safetensors")
    with np.load(os.path.join(FIXTURES, f"cm_unet_{name}.npz")) as z:
        return weights, dict(z)


def _kwargs(name):
    kw = {k: v for k, v in ARCH[name].items() if k != "image_size"}
    return dict(kw, norm_groups=32, dropout=0.0)


def _labels(ref):
    return ref.get("labels")


_COMPILED = {}


def _compiled_apply(module_cls, kwargs):
    """``make_apply_fn`` of ``module_cls(**kwargs)`` with its forward pass jitted, one per architecture
    for the module: the checks of one network (its outputs, its run's samples) share one compilation
    of the fixtures' batch of 4, where eager execution compiled the network's hundreds of operations
    for each of them."""
    import json

    key = (module_cls.__name__, json.dumps(dict(kwargs), sort_keys=True, default=list))
    if key not in _COMPILED:
        apply_fn = make_apply_fn(module_cls(**kwargs))
        jitted = jax.jit(lambda p, x, c, labels: apply_fn(p, x, c, labels=labels))
        # Host copies of the parameters: a run's (placed on a mesh) and the converter's (NumPy) then
        # hit one compilation.
        _COMPILED[key] = lambda p, x, c, *, labels=None, **_: jitted(
            jax.device_get(p), x, c, labels
        )
    return _COMPILED[key]


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_converted_network_equals_the_official_one(name):
    weights, ref = _fixture(name)
    state_dict = load_file(weights)
    assert all(v.dtype == np.float16 for v in state_dict.values())  # cast to float32 on the way
    params = convert.cm_params(state_dict, _kwargs(name), 16)
    apply_fn = _compiled_apply(ADMUNet, _kwargs(name))
    out = apply_fn(params, ref["x_in"], ref["timesteps"], labels=_labels(ref))
    assert np.abs(np.asarray(out) - ref["out"]).max() <= 1e-5
    # cm's time input is 1000·0.25·ln σ: the library's c_noise(kind="cm") gives the same.
    np.testing.assert_allclose(
        param_lib.c_noise(ref["sigma"].astype(np.float32), "cm"), ref["timesteps"], rtol=1e-6
    )


def _f_reference(ref, x, edm=False):
    """f(x, σ) = c_skip·x + c_out·F (CM Eq. 5, or EDM Eq. 7 for the teacher) in float64 from the
    official network's outputs F."""
    s = ref["sigma"][:, None, None, None]
    eps = 0.0 if edm else SIGMA_MIN
    c_skip = SIGMA_DATA**2 / ((s - eps) ** 2 + SIGMA_DATA**2)
    c_out = SIGMA_DATA * (s - eps) / np.sqrt(SIGMA_DATA**2 + s**2)
    return c_skip * x + c_out * ref["out"].astype(np.float64)


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("convert") / "cd_run")
    weights, _ = _fixture("cond")
    summary = convert.convert_cm(weights, out, config="imagenet64", method="cd", arch=ARCH["cond"])
    assert summary["tensors"] == 161 and os.path.isfile(os.path.join(out, convert.PROVENANCE))
    return out


def test_cd_run_gives_f_of_the_official_network(cd_run):
    _, ref = _fixture("cond")
    config, params, step = loading.load_eval_params(cd_run)
    assert (config.method, config.sigmas.c_noise, step) == ("cd", "cm", 0)
    assert config.model.kwargs.norm_groups == 32 and config.data.image_size == 16
    apply_fn = _compiled_apply(ADMUNet, config.model.kwargs)
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    x = (ref["sigma"][:, None, None, None] * ref["z"]).astype(np.float32)
    want = _f_reference(ref, x.astype(np.float64))
    # One-step samples from the fixed noise z of the first two examples (σ = T, CM Algorithm 1),
    # computed in the fixtures' batch of 4 (the network's compiled shape; examples are independent).
    one_step = samplers.multistep_sample(
        apply_fn, params, jax.random.key(0), x.shape, (T,), sigmas, labels=ref["labels"], x_init=x
    )
    assert np.abs(np.asarray(one_step)[:2] - want[:2]).max() <= 1e-5


def test_sampling_command_reads_the_converted_run(cd_run, tmp_path):
    from consistency_jax import sample

    request = sample.SampleRequest(
        workdir=cd_run,
        out=str(tmp_path / "samples"),
        num_samples=4,
        per_device_batch=4,
        examples_per_shard=4,
        grid=False,
        seed=1,
    )
    summary = sample.run(request)
    with np.load(summary["npz"]) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert ((0 <= labels) & (labels < 10)).all()


def test_edm_run_is_a_cd_teacher(tmp_path):
    weights, ref = _fixture("uncond")
    out = str(tmp_path / "edm_run")
    convert.convert_cm(weights, out, config="lsun256", method="edm", arch=ARCH["uncond"])
    assert loading.teacher_config(out).method == "edm"
    denoise, params = loading.load_teacher(out)
    x = (ref["sigma"][:, None, None, None] * ref["z"]).astype(np.float32)
    got = jax.jit(denoise)(params, x, ref["sigma"].astype(np.float32))  # one compilation
    assert np.abs(np.asarray(got) - _f_reference(ref, x.astype(np.float64), edm=True)).max() <= 1e-5


def test_paper_networks_keep_their_config():
    """For the released widths num_groups(C) is cm's 32: the run's network is the config file's."""
    for config, method in (("imagenet64", "cd"), ("lsun256", "edm")):
        c = convert.run_config(config, method)
        abstract = convert.abstract_params(c)
        assert not convert.needs_fixed_groups(abstract)
        assert "norm_groups" not in c.model.kwargs and c.sigmas.c_noise == "cm"


# --------------------------------------------------------------------------------------------------
# Refusals


def _write(tmp_path, state_dict):
    path = str(tmp_path / "edited.safetensors")
    save_file(state_dict, path)
    return path


def _convert(path, tmp_path, **kw):
    kw = {"config": "imagenet64", "method": "cd", "arch": ARCH["cond"], **kw}
    return convert.convert_cm(path, str(tmp_path / "run"), **kw)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("missing", "1 missing tensor(s): middle_block.1.qkv.weight"),
        ("extra", "1 unexpected tensor(s): middle_block.1.extra.weight"),
        ("shape", "1 of the wrong shape: out.2.weight (3, 32, 3, 1) (expected (3, 32, 3, 3))"),
    ],
)
def test_refuses_a_checkpoint_that_is_not_the_network(tmp_path, edit, message):
    state_dict = load_file(_fixture("cond")[0])
    if edit == "missing":
        del state_dict["middle_block.1.qkv.weight"]
    elif edit == "extra":
        state_dict["middle_block.1.extra.weight"] = np.ones((2,), np.float16)
    else:
        state_dict["out.2.weight"] = state_dict["out.2.weight"][..., :1].copy()
    with pytest.raises(convert.ConvertError) as e:
        _convert(_write(tmp_path, state_dict), tmp_path)
    assert message in str(e.value) and "architecture flags" in str(e.value)
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_refuses_wrong_architecture_flags(tmp_path):
    weights, _ = _fixture("cond")
    with pytest.raises(convert.ConvertError, match="unexpected tensor.*label_emb.weight"):
        _convert(weights, tmp_path, arch=dict(ARCH["cond"], num_classes=None))
    with pytest.raises(
        convert.ConvertError, match=r"84 missing tensor\(s\): input_blocks.2.1.norm.bias"
    ):
        _convert(weights, tmp_path, arch=dict(ARCH["cond"], num_res_blocks=2))
    with pytest.raises(convert.ConvertError, match="not the ADM UNet described"):
        _convert(weights, tmp_path, config="lsun256", arch={})  # the paper LSUN network
    assert not os.path.exists(tmp_path / "run")


def test_refuses_truncated_and_foreign_files(tmp_path):
    weights, _ = _fixture("cond")
    with open(weights, "rb") as f:
        data = f.read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConvertError, match="truncated or not a checkpoint"):
        _convert(str(truncated), tmp_path)
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("not a checkpoint")
    with pytest.raises(convert.ConvertError, match="not a readable safetensors file"):
        _convert(str(foreign), tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(convert.ConvertError, match="give a PyTorch state dict"):
        _convert(str(tmp_path / "weights.npz"), tmp_path)
    with pytest.raises(convert.ConvertError, match="No checkpoint file"):
        _convert(str(tmp_path / "absent.pt"), tmp_path)
    assert not os.path.exists(tmp_path / "run")


def test_pt_files_are_read_without_torch_and_foreign_ones_refused(tmp_path):
    """A ``.pt`` state dict is read by ``torch_pickle`` (no torch): the fixture written by torch
    (tools/make_torch_fixtures.py) comes back as torch.load gave it, bfloat16 widened to float32;
    a pickle naming another global, or a file that is not a checkpoint, is refused."""
    torch_fixtures = os.path.join(FIXTURES, "torch")
    got = convert.read_state_dict(os.path.join(torch_fixtures, "legacy.pt"))
    with np.load(os.path.join(torch_fixtures, "expected.npz")) as z:
        assert np.array_equal(got["float32"], z["legacy/float32"])
        assert np.array_equal(got["transposed"], z["legacy/transposed"])
        bf16 = z["legacy/bfloat16.bf16bits"].astype(np.uint32) << 16
        assert got["bfloat16"].dtype == np.float32
        assert np.array_equal(got["bfloat16"], bf16.view(np.float32))
    with pytest.raises(convert.ConvertError, match="global posix.system"):
        convert.read_state_dict(os.path.join(torch_fixtures, "evil_zip.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.ConvertError, match="not a readable PyTorch checkpoint"):
        convert.read_state_dict(str(tmp_path / "bad.pt"))
    with pytest.raises(convert.ConvertError, match="global posix.system"):
        _convert(os.path.join(torch_fixtures, "evil_zip.pt"), tmp_path)
    assert not os.path.exists(tmp_path / "run")


def test_a_pt_file_converts_as_its_safetensors_copy(tmp_path):
    """The cm fixture written as a PyTorch zip checkpoint (by ``torch_pickle.write_state_dict``,
    whose output torch.load reads: tests/test_torch_pickle.py) converts to the same parameters as its
    .safetensors copy; where torch is installed, torch.save's zip and legacy files do too."""
    from consistency_jax import torch_pickle

    arrays = load_file(_fixture("cond")[0])
    want = convert.read_state_dict(_fixture("cond")[0])
    paths = [tmp_path / "written.pt"]
    torch_pickle.write_state_dict(paths[0], arrays)
    if importlib.util.find_spec("torch") is not None:  # a cross-check, not the test's only check
        import torch

        state = {k: torch.from_numpy(v) for k, v in arrays.items()}
        for legacy in (False, True):
            paths.append(tmp_path / f"cd{legacy}.pt")
            torch.save(state, paths[-1], _use_new_zipfile_serialization=not legacy)
    for path in paths:
        got = convert.read_state_dict(str(path))
        assert sorted(got) == sorted(want)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want), path


@pytest.mark.slow
def test_command_refuses_a_non_empty_out_then_overwrites(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    weights, _ = _fixture("uncond")
    cmd = [
        sys.executable,
        "-m",
        "consistency_jax.convert",
        "--from=cm",
        f"--checkpoint={weights}",
        "--config=lsun256",
        "--method=ct",
        f"--out={out}",
        "--image_size=16",
        "--model_channels=32",
        "--channel_mult=1,1",
        "--num_res_blocks=1",
        "--attention_resolutions=8",
        "--num_head_channels=-1",
        "--num_heads=2",
        "--resblock_updown=false",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "is not empty; pass --overwrite" in refused.stderr
    done = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Converted 126 tensors" in done.stdout and (out / "keep.txt").exists()
    config, _, _ = loading.load_eval_params(str(out))
    assert config.method == "ct" and config.model.kwargs.num_classes is None


# --------------------------------------------------------------------------------------------------
# jcm: the JAX CIFAR-10 checkpoints (tools/make_jcm_fixture.py: jcm's NCSN++ at nf 8, a msgpack state)

JCM_ARCH = dict(image_size=16, nf=8, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,))
JCM_WEIGHTS = os.path.join(FIXTURES, "jcm_ncsnpp.msgpack")


def _jcm_reference():
    with np.load(os.path.join(FIXTURES, "jcm_ncsnpp.npz")) as z:
        return dict(z)


def _jcm_kwargs():
    c = convert.run_config("cifar10", "cd", arch=JCM_ARCH)
    return dict(c.model.kwargs)


def test_jcm_network_equals_the_official_one():
    from consistency_jax.networks.ncsnpp import NCSNpp

    ref = _jcm_reference()
    state = convert.read_jcm_state(JCM_WEIGHTS)
    assert {"params", "params_ema", "model_state", "opt_state"} <= set(state)
    params = convert.jcm_params(state["params_ema"], _jcm_kwargs(), 16)
    out = _compiled_apply(NCSNpp, _jcm_kwargs())(params, ref["x_in"], ref["c_noise"])
    assert np.abs(np.asarray(out) - ref["out"]).max() <= 1e-5
    np.testing.assert_allclose(param_lib.c_noise(ref["sigma"], "jcm"), ref["c_noise"], rtol=1e-6)


@pytest.fixture(scope="module")
def jcm_cd_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("convert") / "jcm_cd_run")
    summary = convert.convert_jcm(JCM_WEIGHTS, out, config="cifar10", method="cd", arch=JCM_ARCH)
    assert summary["tree"] == "params_ema" and summary["tensors"] == 217
    return out


def test_jcm_cd_run_gives_jcm_distiller(jcm_cd_run):
    from consistency_jax.networks.ncsnpp import NCSNpp

    ref = _jcm_reference()
    config, params, step = loading.load_eval_params(jcm_cd_run)
    assert (config.method, config.sigmas.c_noise, step) == ("cd", "jcm", 0)
    apply_fn = _compiled_apply(NCSNpp, config.model.kwargs)
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    x = ref["sigma"][:, None, None, None] * ref["z"]
    # One-step samples from the fixed noise (σ = T: the first two examples) equal jcm's
    # get_distiller_fn f(x, T); computed in the fixtures' batch of 4 (the compiled shape).
    one_step = samplers.multistep_sample(
        apply_fn, params, jax.random.key(0), x.shape, (T,), sigmas, x_init=x
    )
    assert np.abs(np.asarray(one_step)[:2] - ref["f"][:2]).max() <= 1e-5


def test_jcm_sampling_command_reads_the_converted_run(jcm_cd_run, tmp_path):
    from consistency_jax import sample

    request = sample.SampleRequest(
        workdir=jcm_cd_run,
        out=str(tmp_path / "samples"),
        num_samples=2,
        per_device_batch=2,
        examples_per_shard=2,
        grid=False,
        seed=1,
    )
    with np.load(sample.run(request)["npz"]) as z:
        assert z["arr_0"].shape == (2, 16, 16, 3) and z["arr_0"].dtype == np.uint8


def test_jcm_edm_run_is_a_cd_teacher_with_jcm_denoiser(tmp_path):
    ref = _jcm_reference()
    out = str(tmp_path / "edm_run")
    convert.convert_jcm(JCM_WEIGHTS, out, config="cifar10", method="edm", arch=JCM_ARCH)
    denoise, params = loading.load_teacher(out)
    x = ref["sigma"][:, None, None, None] * ref["z"]
    got = jax.jit(denoise)(params, x, ref["sigma"])  # one compilation
    assert np.abs(np.asarray(got) - ref["denoised"]).max() <= 1e-5
    # The run holds the state's params_ema, not its (different) params.
    state = convert.read_jcm_state(JCM_WEIGHTS)
    kernel = np.asarray(params["ResBlock_0"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(
        kernel, state["params_ema"]["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"]
    )
    assert not np.allclose(kernel, state["params"]["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"])


def _jcm_edited(tmp_path, edit):
    from flax import serialization

    state = convert.read_jcm_state(JCM_WEIGHTS)
    tree = state["params_ema"]
    if edit == "missing":
        del tree["AttnBlockpp_1"]["NIN_2"]["W"]
    elif edit == "extra":
        tree["AttnBlockpp_1"]["NIN_4"] = {"W": np.ones((2, 2), np.float32)}
    elif edit == "shape":
        tree["Conv_1"]["kernel"] = tree["Conv_1"]["kernel"][:, :1]
    elif edit == "nan":
        tree["Conv_1"]["kernel"] = tree["Conv_1"]["kernel"].copy()
        tree["Conv_1"]["kernel"][0, 0, 0, 0] = np.nan
    path = tmp_path / "edited"
    path.write_bytes(serialization.msgpack_serialize(state))
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("missing", "1 missing tensor(s): AttnBlockpp_1/NIN_2/W"),
        ("extra", "1 unexpected tensor(s): AttnBlockpp_1/NIN_4/W"),
        ("shape", "1 of the wrong shape: Conv_1/kernel (3, 1, 8, 3) (expected (3, 3, 8, 3))"),
    ],
)
def test_jcm_refuses_a_checkpoint_that_is_not_the_network(tmp_path, edit, message):
    with pytest.raises(convert.ConvertError) as e:
        convert.convert_jcm(_jcm_edited(tmp_path, edit), str(tmp_path / "run"), arch=JCM_ARCH)
    assert message in str(e.value) and "--nf, --ch_mult" in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_jcm_refuses_wrong_flags_truncated_and_foreign_files(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(convert.ConvertError, match=r"missing tensor\(s\).*ResnetBlockBigGANpp_"):
        convert.convert_jcm(JCM_WEIGHTS, run, arch=dict(JCM_ARCH, num_res_blocks=2))
    with pytest.raises(convert.ConvertError, match="not the NCSN.. described"):
        convert.convert_jcm(JCM_WEIGHTS, run)  # the paper's CIFAR-10 network
    with open(JCM_WEIGHTS, "rb") as f:
        data = f.read()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConvertError, match="not a readable flax msgpack checkpoint"):
        convert.convert_jcm(str(tmp_path / "truncated"), run, arch=JCM_ARCH)
    (tmp_path / "notes").write_text("not a checkpoint")
    with pytest.raises(
        convert.ConvertError, match="not a readable flax msgpack checkpoint|not a flax"
    ):
        convert.convert_jcm(str(tmp_path / "notes"), run, arch=JCM_ARCH)
    with pytest.raises(convert.ConvertError, match="does not use NCSN"):
        convert.convert_jcm(JCM_WEIGHTS, run, config="imagenet64", arch={})
    assert not os.path.exists(run)


# --------------------------------------------------------------------------------------------------
# diffusers: UNet2DModel copies of cm's models (tools/make_diffusers_fixture.py)

DIFFUSERS = os.path.join(FIXTURES, "diffusers_unet")


def _diffusers_reference():
    with np.load(os.path.join(DIFFUSERS, "reference.npz")) as z:
        return dict(z)


def test_diffusers_network_equals_the_diffusers_one():
    import json

    with open(os.path.join(DIFFUSERS, "config.json")) as f:
        arch = convert.diffusers_arch(json.load(f))
    assert arch == dict(ARCH["cond"], attention_resolutions=(8,), num_heads=1, num_channels=3)
    kwargs = dict(
        {k: v for k, v in arch.items() if k not in ("image_size", "num_channels")},
        norm_groups=32,
        dropout=0.0,
    )
    state_dict = load_file(os.path.join(DIFFUSERS, "diffusion_pytorch_model.safetensors"))
    params = convert.cm_params(convert.diffusers_state_dict(state_dict, kwargs, 16), kwargs, 16)
    ref = _diffusers_reference()
    out = _compiled_apply(ADMUNet, kwargs)(
        params, ref["x_in"], ref["timesteps"], labels=ref["labels"]
    )
    err = np.abs(np.asarray(out) - ref["out"]).reshape(len(ref["sigma"]), -1).max(axis=1)
    # ≤ 1e-5 where one-step sampling evaluates (σ = 80); at σ = 0.02 (|t| ≈ 978) torch's and XLA's
    # float32 sinusoidal embeddings differ by ~2e-6, which the network carries to ~1.1e-5.
    assert err[:2].max() <= 1e-5 and err.max() <= 2e-5, err
    # diffusers' CMStochasticIterativeScheduler.sigma_to_t is cm's c_noise.
    np.testing.assert_allclose(
        param_lib.c_noise(ref["sigma"].astype(np.float32), "cm"), ref["timesteps"], rtol=1e-6
    )


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("convert") / "diffusers_run")
    summary = convert.convert_diffusers(DIFFUSERS, out, method="cd")
    assert summary["tensors"] == 159 and summary["config"] == "imagenet64"
    return out


def test_diffusers_run_samples_like_the_pipeline(diffusers_run, tmp_path):
    from consistency_jax import sample

    ref = _diffusers_reference()
    config, params, _ = loading.load_eval_params(diffusers_run)
    assert config.sigmas.c_noise == "cm" and config.model.kwargs.norm_groups == 32
    apply_fn = _compiled_apply(ADMUNet, config.model.kwargs)
    sigmas = param_lib.SigmaConfig(**config.sigmas.to_dict())
    x = (ref["sigma"][:, None, None, None] * ref["z"]).astype(np.float32)
    one_step = samplers.multistep_sample(
        apply_fn, params, jax.random.key(0), x.shape, (T,), sigmas, labels=ref["labels"], x_init=x
    )  # the first two examples are at σ = T; the batch of 4 is the compiled shape
    want = _f_reference(ref, x.astype(np.float64))[:2]
    assert np.abs(np.asarray(one_step)[:2] - want).max() <= 1e-5
    request = sample.SampleRequest(
        workdir=diffusers_run,
        out=str(tmp_path / "samples"),
        num_samples=4,
        per_device_batch=4,
        examples_per_shard=4,
        grid=False,
        seed=1,
    )
    with np.load(sample.run(request)["npz"]) as z:
        assert z["arr_0"].shape == (4, 16, 16, 3) and ((0 <= z["arr_1"]) & (z["arr_1"] < 10)).all()


def _diffusers_copy(tmp_path, edit=None, config_edit=None):
    import json
    import shutil

    d = tmp_path / "unet"
    d.mkdir()
    shutil.copy(os.path.join(DIFFUSERS, "config.json"), d / "config.json")
    state_dict = load_file(os.path.join(DIFFUSERS, "diffusion_pytorch_model.safetensors"))
    if edit:
        edit(state_dict)
    save_file(state_dict, str(d / "diffusion_pytorch_model.safetensors"))
    if config_edit:
        with open(d / "config.json") as f:
            config = json.load(f)
        config.update(config_edit)
        with open(d / "config.json", "w") as f:
            json.dump(config, f)
    return str(d)


def _drop(name):
    return lambda sd: sd.pop(name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            _drop("mid_block.attentions.0.to_k.weight"),
            "1 missing tensor(s): mid_block.attentions.0.to_k.weight",
        ),
        (
            lambda sd: sd.update({"mid_block.extra.weight": np.ones((2,), np.float16)}),
            "1 unexpected tensor(s): mid_block.extra.weight",
        ),
        (
            lambda sd: sd.update({"conv_out.weight": sd["conv_out.weight"][..., :1].copy()}),
            "1 of the wrong shape: conv_out.weight (3, 32, 3, 1) (expected (3, 32, 3, 3))",
        ),
    ],
)
def test_diffusers_refuses_a_checkpoint_that_is_not_the_network(tmp_path, edit, message):
    with pytest.raises(convert.ConvertError) as e:
        convert.convert_diffusers(_diffusers_copy(tmp_path, edit=edit), str(tmp_path / "run"))
    assert message in str(e.value) and "config.json" in str(e.value)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "field, value",
    [
        ("time_embedding_type", "fourier"),
        ("flip_sin_to_cos", False),
        ("up_block_types", ["ResnetUpsampleBlock2D", "AttnUpBlock2D"]),
        ("attn_norm_num_groups", None),
        ("downsample_type", "conv"),
        ("block_out_channels", [32, 48]),
        ("norm_num_groups", 16),
        ("cross_attention_dim", 8),
    ],
)
def test_diffusers_refuses_a_config_the_adm_unet_cannot_represent(tmp_path, field, value):
    with pytest.raises(convert.ConvertError, match=field):
        convert.convert_diffusers(
            _diffusers_copy(tmp_path, config_edit={field: value}), str(tmp_path / "run")
        )
    assert not os.path.exists(tmp_path / "run")


def test_refuses_a_non_empty_out_then_overwrites_in_process(tmp_path):
    """The quick form of test_command_refuses_a_non_empty_out_then_overwrites: what the command
    calls, in this process, with the command's arguments."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    weights, _ = _fixture("uncond")
    kwargs = dict(config="lsun256", method="ct", arch=ARCH["uncond"])
    with pytest.raises(convert.ConvertError, match="is not empty; pass --overwrite"):
        convert.convert_cm(weights, str(out), **kwargs)
    assert os.listdir(out) == ["keep.txt"]
    summary = convert.convert_cm(weights, str(out), overwrite=True, **kwargs)
    assert summary["tensors"] == 126 and (out / "keep.txt").exists()
    config, _, _ = loading.load_eval_params(str(out))
    assert config.method == "ct" and config.model.kwargs.num_classes is None


# --------------------------------------------------------------------------------------------------
# Defects of issue 30: non-finite tensors, --out below a file, DDP's prefix, a failed write


def test_a_nan_is_refused_naming_the_file_and_the_tensor_and_nothing_is_left(tmp_path):
    state_dict = load_file(_fixture("cond")[0])
    state_dict["out.2.weight"] = state_dict["out.2.weight"].copy()
    state_dict["out.2.weight"][0, 0, 0, 0] = np.nan
    path = _write(tmp_path, state_dict)
    with pytest.raises(
        convert.ConvertError, match=r"edited.safetensors: tensor out.2.weight holds 1"
    ):
        _convert(path, tmp_path)
    assert not os.path.exists(tmp_path / "run")
    jcm = _jcm_edited(tmp_path, "nan")
    with pytest.raises(
        convert.ConvertError, match=r"edited: tensor Conv_1/kernel holds 1 non-finite"
    ):
        convert.convert_jcm(jcm, str(tmp_path / "run"), arch=JCM_ARCH)
    assert not os.path.exists(tmp_path / "run")
    _convert(_fixture("cond")[0], tmp_path)  # the rerun with a good file is not blocked
    assert os.path.isfile(tmp_path / "run" / convert.PROVENANCE)


def test_out_below_a_file_is_refused_clearly(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(convert.ConvertError, match=r"lies below .*afile, which is a file"):
        convert.convert_cm(
            _fixture("cond")[0],
            str(tmp_path / "afile" / "sub" / "run"),
            config="imagenet64",
            method="cd",
            arch=ARCH["cond"],
        )


def test_a_ddp_prefix_is_stripped_and_a_partial_one_explained(tmp_path):
    plain_dict = load_file(_fixture("cond")[0])
    want = convert.cm_params(plain_dict, _kwargs("cond"), 16)
    prefixed = {f"module.{k}": v for k, v in plain_dict.items()}
    got = convert.cm_params(prefixed, _kwargs("cond"), 16)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.array_equal(a, b)
    partly = dict(plain_dict)
    partly["module.out.2.bias"] = partly.pop("out.2.bias")
    with pytest.raises(convert.ConvertError, match=r"start with 'module.'.*strip it"):
        convert.cm_params(partly, _kwargs("cond"), 16)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from consistency_jax import checkpoint

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", fail)
    with pytest.raises(convert.ConvertError, match="No space left on device.*removed"):
        _convert(_fixture("cond")[0], tmp_path)
    assert not os.path.exists(tmp_path / "run")
    (tmp_path / "run").mkdir()  # an empty --out of the user's own is kept, emptied
    with pytest.raises(convert.ConvertError, match="No space left"):
        _convert(_fixture("cond")[0], tmp_path)
    assert os.listdir(tmp_path / "run") == []
