"""The PyTorch checkpoint reader (``consistency_jax.torch_pickle``), without PyTorch.

Fixtures (tools/make_torch_fixtures.py, written by torch 2.13): one state dict in the zip and the
legacy format and a big-endian archive, and the arrays ``torch.load(weights_only=True)`` gave for
each (``expected.npz``); two checkpoints whose pickle would run ``os.system`` / ``builtins.eval``.
"""

import importlib.util
import os
import pickle
import shutil
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from consistency_jax import torch_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch")
NAMES = (
    "float32 float16 bfloat16 int64 float64 int8 bool scalar empty param transposed sliced "
    "shared_a shared_b half_transposed bf16_slice"
).split()


def _expected(kind):
    with np.load(os.path.join(FIXTURES, "expected.npz")) as z:
        out = {}
        for key in z.files:
            file, name = key.split("/", 1)
            if file != kind:
                continue
            if name.endswith(".bf16bits"):
                out[name[: -len(".bf16bits")]] = z[key].view(ml_dtypes.bfloat16)
            else:
                out[name] = z[key]
    return out


def _same_bits(a, b):
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.tobytes() == np.ascontiguousarray(b).tobytes()
    )


@pytest.mark.parametrize("kind", ["zip", "legacy", "big"])
def test_every_tensor_is_bit_identical_to_torch_load(kind):
    got = torch_pickle.read_state_dict(os.path.join(FIXTURES, f"{kind}.pt"))
    want = _expected(kind)
    assert sorted(got) == sorted(want) == sorted(NAMES)
    for name in NAMES:
        assert _same_bits(got[name], want[name]), name
        assert got[name].flags.c_contiguous and got[name].flags.writeable
    assert got["bfloat16"].dtype == ml_dtypes.bfloat16 and got["int64"].dtype == np.int64
    assert got["scalar"].shape == () and got["empty"].shape == (0, 3)
    # The views and the shared storage, checked against each other (independent of torch):
    # transposed is base.T and sliced is base[1:3, 2:5] of the same 4x6 base.
    base = got["transposed"].T
    assert _same_bits(got["sliced"], base[1:3, 2:5])
    assert np.array_equal(got["shared_a"].ravel(), np.arange(2, 8))
    assert np.array_equal(got["shared_b"], np.arange(0, 12, 3))


def test_the_big_endian_archive_holds_the_same_values_as_the_little_endian_one():
    little, big = _expected("zip"), _expected("big")
    assert all(_same_bits(little[n], big[n]) for n in NAMES)  # torch itself agrees
    with zipfile.ZipFile(os.path.join(FIXTURES, "big.pt")) as z:
        assert z.read("zip/byteorder") == b"big"
        little_raw = zipfile.ZipFile(os.path.join(FIXTURES, "zip.pt")).read("zip/data/0")
        assert z.read("zip/data/0") != little_raw  # really swapped on disk


@pytest.mark.parametrize(
    "name, named",
    [("evil_zip.pt", "posix.system"), ("evil_legacy.pt", "__builtin__.eval (builtins.eval)")],
)
def test_a_pickle_naming_another_global_is_refused_by_name_and_nothing_runs(
    name, named, tmp_path, monkeypatch
):
    """os.system pickles as posix.system; eval under protocol 2 as __builtin__.eval."""
    monkeypatch.chdir(tmp_path)  # the payload would create ./PWNED
    with pytest.raises(torch_pickle.UnsafeGlobalError) as e:
        torch_pickle.load(os.path.join(FIXTURES, name))
    assert f"names the global {named}," in str(e.value)
    assert name in str(e.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "module, name",
    [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load")],
)
def test_any_global_outside_the_allowed_few_is_refused(module, name, tmp_path, monkeypatch):
    """A zip checkpoint whose data.pkl is edited to call ``module.name`` (written here by hand with
    pickle's GLOBAL opcode; no torch needed)."""
    monkeypatch.chdir(tmp_path)
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x05\x00\x00\x00touchq\x00\x85R."
    path = tmp_path / "edited.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("edited/data.pkl", payload)
        z.writestr("edited/byteorder", "little")
    with pytest.raises(torch_pickle.UnsafeGlobalError, match=f"global {module}.{name}"):
        torch_pickle.load(path)


def test_a_pickle_may_not_set_the_state_of_the_readers_objects(tmp_path):
    """BUILD on a storage type (which would change its dtype for later files) is refused."""
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb."
    path = tmp_path / "build.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("build/data.pkl", payload)
    with pytest.raises(torch_pickle.TorchPickleError, match="sets the state"):
        torch_pickle.load(path)
    assert torch_pickle.STORAGE_DTYPES["FloatStorage"] == np.float32


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _text(text):
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _int(n):
    return b"J" + struct.pack("<i", n)


def _one_tensor_pickle(size, offset=0):
    """data.pkl of {"a": a float32 tensor of ``size`` at ``offset``, stride 1, on storage "0" of 6
    elements}, written opcode by opcode as torch writes it."""
    storage_id = (
        b"(" + _text("storage") + _global("torch", "FloatStorage") + _text("0") + _text("cpu")
    )
    return (
        b"\x80\x02"
        + _global("collections", "OrderedDict")
        + b")R("
        + _text("a")
        + _global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + storage_id
        + _int(6)
        + b"tQ"
        + _int(offset)
        + _int(size)
        + b"\x85"
        + _int(1)
        + b"\x85\x89"
        + _global("collections", "OrderedDict")
        + b")RtRu."
    )


def test_a_view_beyond_its_storage_is_refused(tmp_path):
    """A tensor reaching past its 6-element storage is refused, never read out of bounds."""
    path = tmp_path / "oob.pt"
    for size, offset, ok in ((6, 0, True), (4, 2, True), (10, 0, False), (5, 2, False)):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("oob/data.pkl", _one_tensor_pickle(size, offset))
            z.writestr("oob/data/0", np.arange(6, dtype=np.float32).tobytes())
        if ok:
            got = torch_pickle.load(path)["a"]
            assert np.array_equal(got, np.arange(offset, offset + size, dtype=np.float32))
        else:
            with pytest.raises(torch_pickle.TorchPickleError, match="beyond its storage"):
                torch_pickle.load(path)


def test_truncated_and_foreign_files_are_refused_with_the_file_named(tmp_path):
    legacy = open(os.path.join(FIXTURES, "legacy.pt"), "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(legacy[: len(legacy) - 10])
    with pytest.raises(torch_pickle.TorchPickleError, match="cut.pt.*truncated"):
        torch_pickle.load(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(torch_pickle.TorchPickleError, match="junk.pt"):
        torch_pickle.load(junk)
    zipped = tmp_path / "half.pt"
    shutil.copy(os.path.join(FIXTURES, "zip.pt"), zipped)
    zipped.write_bytes(zipped.read_bytes()[:-700])
    with pytest.raises(torch_pickle.TorchPickleError, match="half.pt"):
        torch_pickle.load(zipped)
    listed = tmp_path / "list.pt"
    with zipfile.ZipFile(listed, "w") as z:
        z.writestr("list/data.pkl", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(torch_pickle.TorchPickleError, match="not a state dict"):
        torch_pickle.read_state_dict(listed)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        torch_pickle.read_state_dict(tmp_path / "absent.pt")


def test_written_state_dicts_read_back_bit_for_bit(tmp_path):
    """``write_state_dict`` (the zip format, no torch) and the reader agree, views included; where
    torch is installed it reads the file too (optional cross-check)."""
    rng = np.random.default_rng(3)
    state = {
        "w": rng.normal(size=(4, 3)).astype(np.float32).T,  # a transposed view: written contiguous
        "h": rng.normal(size=5).astype(np.float16),
        "b": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16),
        "i": np.array(2**40 + 7, np.int64),
        "e": np.zeros((0, 2), np.float32),
    }
    path = tmp_path / "written.pt"
    torch_pickle.write_state_dict(path, state)
    got = torch_pickle.read_state_dict(path)
    assert list(got) == list(state)
    for k, v in state.items():
        assert _same_bits(got[k], v), k
    if importlib.util.find_spec("torch") is not None:
        import torch

        loaded = torch.load(path, weights_only=True)
        for k, v in state.items():
            t = loaded[k]
            bits = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert tuple(t.shape) == v.shape and bits.tobytes() == v.tobytes()
