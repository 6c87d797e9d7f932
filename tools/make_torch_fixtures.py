"""Writes the PyTorch checkpoint fixtures of tests/test_torch_pickle.py (needs torch; the test does not).

    pip install torch==2.13.0
    python tools/make_torch_fixtures.py --out tests/fixtures/torch

Files written:

* ``zip.pt`` / ``legacy.pt``: one state dict saved by ``torch.save`` in the zip format and in the
  legacy (pre-1.6) format (``_use_new_zipfile_serialization=False``): float32, float16, bfloat16,
  int64, float64, int8, bool tensors, a ``Parameter``, a 0-d and an empty tensor, a transposed view
  (non-contiguous), a slice with a storage offset, and two tensors sharing one storage;
* ``big.pt``: ``zip.pt`` made big-endian. PyTorch writes only the host's byte order (little here),
  so this archive is built by editing: its ``byteorder`` record says ``big`` and every storage's
  elements are byte-swapped (PyTorch's own loader reads it, and the expected arrays below come from
  that ``torch.load``);
* ``expected.npz``: every tensor of each file as ``torch.load(weights_only=True)`` gives it,
  ``<file>/<name>`` (bfloat16 stored as its uint16 bits under ``<file>/<name>.bf16bits``);
* ``evil_zip.pt`` / ``evil_legacy.pt``: a zip and a legacy checkpoint whose pickle calls
  ``os.system`` (and one ``builtins.eval``) to create a marker file named ``PWNED`` in the current
  directory; the reader must refuse them by name and never run them.
"""

from __future__ import annotations

import argparse
import os
import pickletools
import zipfile

import numpy as np


def _state(torch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(12, dtype=torch.int64)
    state = {
        "float32": torch.randn(3, 5, generator=g),
        "float16": torch.randn(7, generator=g).half(),
        "bfloat16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "int64": torch.randint(-(2**40), 2**40, (9,), generator=g, dtype=torch.int64),
        "float64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "int8": torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(4, generator=g)),
        "transposed": base.t(),  # non-contiguous view of base's storage
        "sliced": base[1:3, 2:5],  # a storage offset and strides of a view
        "shared_a": shared[2:8].view(2, 3),  # two tensors on one storage
        "shared_b": shared[::3],
        "half_transposed": torch.randn(3, 4, generator=g).half().t(),
        "bf16_slice": torch.randn(5, 4, generator=g).bfloat16()[1:, ::2],
    }
    assert not state["transposed"].is_contiguous() and state["sliced"].storage_offset() > 0
    assert state["shared_a"].untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    return state


def _expected(torch, path: str) -> dict[str, np.ndarray]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, t in loaded.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[f"{name}.bf16bits"] = t.view(torch.int16).numpy().view(np.uint16)
        else:
            out[name] = t.numpy()
    return out


def _storage_itemsizes(data_pkl: bytes) -> dict[str, int]:
    """Storage key -> element size, read from the pickle's opcodes (``pickletools.genops``, which
    disassembles and runs nothing): the string pushed after a ``torch.XStorage`` global (or a memo
    get of one) is the storage's key."""
    itemsize = {
        "FloatStorage": 4,
        "HalfStorage": 2,
        "BFloat16Storage": 2,
        "LongStorage": 8,
        "DoubleStorage": 8,
        "CharStorage": 1,
        "BoolStorage": 1,
    }
    memo, last, storage_type, sizes = {}, None, None, {}
    for op, arg, _ in pickletools.genops(data_pkl):
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
            continue
        if op.name == "GLOBAL":
            value = tuple(arg.split(" "))
        elif op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE"):
            value = arg
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        else:
            value = None
        if storage_type is not None and isinstance(value, str):
            sizes[value] = itemsize[storage_type]
            storage_type = None
        if isinstance(value, tuple) and value[0] == "torch" and value[1].endswith("Storage"):
            storage_type = value[1]
        last = value
    return sizes


def _big_endian_copy(src: str, dst: str) -> None:
    """``src`` (a little-endian zip checkpoint) rewritten with byteorder ``big`` and every storage's
    elements byte-swapped."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        prefix = next(n for n in names if n.endswith("/data.pkl"))[: -len("data.pkl")]
        sizes = _storage_itemsizes(zin.read(prefix + "data.pkl"))
        for name in names:
            data = zin.read(name)
            if name == prefix + "byteorder":
                data = b"big"
            elif name.startswith(prefix + "data/"):
                size = sizes[name[len(prefix + "data/") :]]
                if size > 1:
                    data = np.frombuffer(data, f"<u{size}").astype(f">u{size}").tobytes()
            zout.writestr(name, data)


class _Evil:
    """Pickles to ``os.system("touch PWNED")``."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("open('PWNED', 'w').close()",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures/torch")
    args = parser.parse_args()
    import torch

    os.makedirs(args.out, exist_ok=True)
    state = _state(torch)
    paths = {name: os.path.join(args.out, f"{name}.pt") for name in ("zip", "legacy", "big")}
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    _big_endian_copy(paths["zip"], paths["big"])
    expected = {}
    for name, path in paths.items():
        for key, value in _expected(torch, path).items():
            expected[f"{name}/{key}"] = value
    np.savez(os.path.join(args.out, "expected.npz"), **expected)

    evil = {"weight": torch.zeros(2), "payload": _Evil()}
    torch.save(evil, os.path.join(args.out, "evil_zip.pt"))
    torch.save(
        {"weight": torch.zeros(2), "payload": _EvilEval()},
        os.path.join(args.out, "evil_legacy.pt"),
        _use_new_zipfile_serialization=False,
    )
    print(f"wrote {sorted(os.listdir(args.out))} to {args.out} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
