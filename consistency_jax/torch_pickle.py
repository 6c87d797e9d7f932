"""Reading PyTorch checkpoints (``torch.save`` files) with Python and NumPy only: no PyTorch, and no
code from the file ever runs.

A ``torch.save`` file is a pickle whose tensors point at raw storages kept beside it. Two layouts:

* the zip archive (PyTorch ≥ 1.6): ``<name>/data.pkl`` (the pickle), ``<name>/data/<key>`` (one raw
  storage each), ``<name>/byteorder`` (``little`` or ``big``; absent in old archives: little);
* the legacy stream (before 1.6): four pickles one after another (the magic number
  0x1950a86a20f9469cfc6c, the protocol version 1001, a ``sys_info`` dict with ``little_endian``, the
  object), a pickled list of storage keys, and then, for each key in that order, its element count
  (int64) and its raw bytes.

The unpickler's ``find_class`` resolves only the names a state dict needs — the tensor rebuilders
(``torch._utils._rebuild_tensor_v2``, ``_rebuild_tensor``, ``_rebuild_parameter``,
``_rebuild_parameter_with_state``), the typed storage classes (``torch.FloatStorage``,
``torch.HalfStorage``, ``torch.BFloat16Storage``, ``torch.LongStorage``, …) and
``collections.OrderedDict`` — to functions of this module, and refuses every other global with an
``UnsafeGlobalError`` naming it (``os.system``, ``builtins.eval``, …). Tensors come back as NumPy
arrays (bfloat16 as ``ml_dtypes.bfloat16``), bit for bit, each its own C-contiguous copy (views and
shared storages resolved; every view is checked to lie inside its storage).

    state = torch_pickle.read_state_dict("pt_inception-2015-12-05-6726825d.pth")
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "TorchPickleError",
    "UnsafeGlobalError",
    "load",
    "read_state_dict",
    "write_state_dict",
]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch's typed storage classes -> the NumPy dtype of their elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class TorchPickleError(ValueError):
    """A file that is not a readable PyTorch checkpoint (truncated, inconsistent, or of a layout this
    reader does not know)."""


class UnsafeGlobalError(TorchPickleError):
    """The pickle names a global outside the few a state dict needs; nothing of it was run."""


class _Inert:
    """Refuses pickle's BUILD (``__setstate__``): a file may not set attributes of the reader's own
    objects."""

    def __setstate__(self, state: Any) -> None:
        raise TorchPickleError(f"the pickle sets the state of a {type(self).__name__}; refused")


class _StorageType(_Inert):
    """What ``torch.FloatStorage`` & co. unpickle to: only their element type."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Inert):
    """A storage named by a persistent id; its elements are filled in once read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None
        self.uses = 0  # tensors on it: a single whole-storage tensor takes the array itself


class _StorageView(_Inert):
    """A legacy view of a storage: elements [offset, offset + size) of ``base``."""

    def __init__(self, base: _Storage, offset: int, size: int):
        self.base, self.offset, self.size = base, offset, size


class _PendingTensor(_Inert):
    """A tensor whose storage may not be read yet (legacy files keep the storages after the pickle)."""

    def __init__(self, storage: Any, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset = storage, offset
        self.size, self.stride = size, stride


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TorchPickleError(f"a tensor's {what} is {value!r}, not a tuple of integers")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, (_Storage, _StorageView)):
        raise TorchPickleError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchPickleError(f"a tensor's storage offset is {storage_offset!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size + stride):
        raise TorchPickleError(f"a tensor's size {size} and stride {stride} do not match")
    (storage.base if isinstance(storage, _StorageView) else storage).uses += 1
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    del requires_grad, backward_hooks, metadata  # autograd state: nothing to keep in NumPy
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves the globals of ``_ALLOWED`` to this module's functions and nothing else."""

    def __init__(self, file: BinaryIO, storages: Mapping[str, Any] | None, origin: str):
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, _Storage] = {}
        self.origin = origin
        self._allow_storages = storages is not None

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            py3 = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module)
            shown = f"{module}.{name}" + (f" ({py3}.{name})" if py3 else "")
            raise UnsafeGlobalError(
                f"{self.origin} names the global {shown}, which a state dict of tensors "
                "does not need; refused (nothing from the file was run)."
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not self._allow_storages:
            raise TorchPickleError(f"{self.origin}: a persistent id {pid!r} where none belongs")
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise TorchPickleError(f"{self.origin}: unknown persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"{self.origin}: storage of unknown type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TorchPickleError(f"{self.origin}: malformed storage id {pid!r}")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        elif storage.dtype != storage_type.dtype:
            raise TorchPickleError(
                f"{self.origin}: storage {key} is read as both {storage.dtype} and "
                f"{storage_type.dtype}"
            )
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storage
        if not isinstance(view, tuple) or len(view) != 3:
            raise TorchPickleError(f"{self.origin}: malformed storage view {view!r}")
        _view_key, offset, size = view
        if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset):
            raise TorchPickleError(f"{self.origin}: malformed storage view {view!r}")
        return _StorageView(storage, offset, size)


def _read_elements(f: BinaryIO, numel: int, dtype: np.dtype, big_endian: bool, what: str):
    """``numel`` elements of ``dtype`` read from ``f`` into a new array (one copy), in native byte
    order, bit for bit."""
    nbytes = numel * dtype.itemsize
    buffer = np.empty(nbytes, np.uint8)
    got = f.readinto(memoryview(buffer)) if nbytes else 0
    if got != nbytes:
        raise TorchPickleError(f"{what} is truncated ({got} of {nbytes} bytes)")
    if big_endian and dtype.itemsize > 1:
        unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: each part
        buffer.view(np.dtype(f"u{unit}")).byteswap(inplace=True)
    return buffer.view(dtype)


def _materialize(obj: Any, origin: str) -> Any:
    """The unpickled object with every pending tensor replaced by its NumPy array."""
    if isinstance(obj, _PendingTensor):
        storage, offset = obj.storage, obj.offset
        if isinstance(storage, _StorageView):
            base = storage.base
            offset += storage.offset
            limit = storage.offset + storage.size
        else:
            base, limit = storage, storage.numel
        if base.array is None:
            raise TorchPickleError(f"{origin}: the data of storage {base.key} is missing")
        limit = min(limit, base.array.size)
        last = offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True))
        if 0 not in obj.size and last >= limit:
            raise TorchPickleError(
                f"{origin}: a tensor of size {obj.size} and stride {obj.stride} at offset "
                f"{obj.offset} reaches beyond its storage {base.key} ({limit} elements)"
            )
        if 0 in obj.size:
            return np.zeros(obj.size, base.dtype)
        count = int(np.prod(obj.size, dtype=np.int64))
        contiguous = all(
            n == 1 or s == int(np.prod(obj.size[i + 1 :], dtype=np.int64))
            for i, (n, s) in enumerate(zip(obj.size, obj.stride, strict=True))
        )
        if base.uses == 1 and offset == 0 and count == base.array.size and contiguous:
            return base.array.reshape(obj.size)  # the storage is this tensor: no copy
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base.array[offset:],
            shape=obj.size,
            strides=tuple(s * item for s in obj.stride),
            writeable=False,
        )
        return np.array(view, order="C", copy=True)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, origin)
        return out
    if isinstance(obj, list):
        return [_materialize(v, origin) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, origin) for v in obj)
    if isinstance(obj, (_Storage, _StorageView)):
        raise TorchPickleError(f"{origin} holds a bare storage, not a tensor")
    return obj


def _load_zip(f: BinaryIO, archive: zipfile.ZipFile, origin: str) -> Any:
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise TorchPickleError(
            f"{origin} is a zip archive but not one torch.save wrote (no single data.pkl)"
        )
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in names:
        order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise TorchPickleError(f"{origin}: unknown byte order record {order!r}")
        big_endian = order == "big"
    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), {}, origin)
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
        record = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(record)
        except KeyError:
            raise TorchPickleError(
                f"{origin}: the record {record} of storage {key} is missing"
            ) from None
        nbytes = storage.numel * storage.dtype.itemsize
        if info.file_size < nbytes:
            raise TorchPickleError(
                f"{origin}: storage {key} holds {info.file_size} bytes, fewer than its "
                f"{storage.numel} elements of {storage.dtype}"
            )
        what = f"{origin} (storage {key})"
        if info.compress_type == zipfile.ZIP_STORED:  # torch's records: read in place, one copy
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise TorchPickleError(f"{what}: no local zip header")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            storage.array = _read_elements(f, storage.numel, storage.dtype, big_endian, what)
        else:
            storage.array = _read_elements(
                io.BytesIO(archive.read(record)), storage.numel, storage.dtype, big_endian, what
            )
    return _materialize(obj, origin)


def _load_legacy(f: BinaryIO, origin: str) -> Any:
    def header() -> Any:
        return _Unpickler(f, None, origin).load()

    try:
        magic = header()
    except UnsafeGlobalError:
        raise
    except Exception as e:  # noqa: BLE001 -- any unpickling error: not a checkpoint
        raise TorchPickleError(
            f"{origin} is not a readable PyTorch checkpoint (neither a zip archive nor a legacy "
            f"torch.save stream): "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    if magic != LEGACY_MAGIC:
        raise TorchPickleError(
            f"{origin} is not a readable PyTorch checkpoint (no zip archive, no legacy magic number)"
        )
    protocol = header()
    if protocol != LEGACY_PROTOCOL:
        raise TorchPickleError(f"{origin}: legacy protocol {protocol!r}, expected 1001")
    sys_info = header()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    unpickler = _Unpickler(f, {}, origin)
    obj = unpickler.load()
    keys = header()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchPickleError(f"{origin}: the storage key list is {type(keys).__name__}")
    count_format = "<q" if little else ">q"
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None:
            raise TorchPickleError(f"{origin}: data of storage {key}, which no tensor names")
        head = f.read(8)
        if len(head) != 8:
            raise TorchPickleError(f"{origin} is truncated (at the data of storage {key})")
        (numel,) = struct.unpack(count_format, head)
        if numel < storage.numel:
            raise TorchPickleError(
                f"{origin}: storage {key} holds {numel} elements, fewer than {storage.numel}"
            )
        storage.array = _read_elements(
            f, numel, storage.dtype, not little, f"{origin} (in the data of storage {key})"
        )
    return _materialize(obj, origin)


def load(path: str | os.PathLike) -> Any:
    """The object a ``torch.save`` file holds, its tensors as NumPy arrays (nothing else is read).

    Raises:
      FileNotFoundError: no such file.
      UnsafeGlobalError: the pickle names a global other than the tensor rebuilders, the storage
        types and ``collections.OrderedDict`` (named in the message; nothing was run).
      TorchPickleError: a truncated or inconsistent file, or not a ``torch.save`` file.
    """
    origin = os.fspath(path)
    with open(origin, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
        f.seek(0)
        try:
            if is_zip:
                with zipfile.ZipFile(f) as archive:
                    return _load_zip(f, archive, origin)
            return _load_legacy(f, origin)
        except TorchPickleError:
            raise
        except (
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            EOFError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            struct.error,
        ) as e:
            raise TorchPickleError(
                f"{origin} is not a readable PyTorch checkpoint (truncated, or not written by "
                f"torch.save?): {type(e).__name__}: {str(e)[:200]}"
            ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a state dict file: a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``; read by
    ``load``, no PyTorch needed) or a ``.safetensors`` file, as name -> NumPy array.

    Raises:
      FileNotFoundError: no such file.
      TorchPickleError: an unreadable file (``UnsafeGlobalError`` for a forbidden global), or one
        that holds no flat mapping name -> tensor.
    """
    origin = os.fspath(path)
    if not os.path.isfile(origin):
        raise FileNotFoundError(f"No checkpoint file {origin!r}.")
    if origin.lower().endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(origin))
        except Exception as e:  # noqa: BLE001 -- safetensors' errors name no common class
            raise TorchPickleError(
                f"{origin} is not a readable safetensors file (truncated or not a checkpoint?): {e}"
            ) from None
    loaded = load(origin)
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in loaded.items()
    ):
        kinds = (
            sorted({type(v).__name__ for v in loaded.values()})
            if isinstance(loaded, Mapping)
            else []
        )
        raise TorchPickleError(
            f"{origin} holds a {type(loaded).__name__}"
            + (f" of {', '.join(kinds)}" if kinds else "")
            + ", not a state dict (a flat mapping name -> tensor)."
        )
    return dict(loaded)


# --------------------------------------------------------------------------------------------------
# Writing (the zip format, for PyTorch users of weights made here, and for tests)


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _op_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")


def _op_tuple(items: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_op_int(i) for i in items) + b"t"


def write_state_dict(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
    """Writes ``state`` (name -> NumPy array) as ``torch.save`` writes a state dict in its zip format,
    so that ``torch.load(path, weights_only=True)`` reads it (no PyTorch needed here).

    Raises:
      TypeError: an array of a dtype PyTorch has no storage for.
    """
    names = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
    origin = os.fspath(path)
    prefix = os.path.splitext(os.path.basename(origin))[0] or "archive"
    body = [b"\x80\x02", _op_global("collections", "OrderedDict"), b")R("]
    records = []
    for index, (key, value) in enumerate(state.items()):
        array = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d 1-d)
        if array.dtype not in names:
            raise TypeError(f"{key}: PyTorch has no storage for dtype {array.dtype}")
        strides = (
            tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        )
        body += [
            _op_str(str(key)),
            _op_global("torch._utils", "_rebuild_tensor_v2"),
            b"((",
            _op_str("storage"),
            _op_global("torch", names[array.dtype]),
            _op_str(str(index)),
            _op_str("cpu"),
            _op_int(array.size),
            b"tQ",
            _op_int(0),
            _op_tuple(array.shape),
            _op_tuple(strides),
            b"\x89",  # requires_grad False
            _op_global("collections", "OrderedDict"),
            b")RtR",
        ]
        records.append((f"{prefix}/data/{index}", array.tobytes()))
    body.append(b"u.")
    with zipfile.ZipFile(origin, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", b"".join(body))
        archive.writestr(f"{prefix}/byteorder", sys.byteorder)
        for name, raw in records:
            archive.writestr(name, raw)
        archive.writestr(f"{prefix}/version", "3\n")
