"""Where a run lives: a local (or mounted) directory or a ``gs://bucket/path`` URL.

Every file a run reads or writes in its workdir goes through these functions, which use
``etils.epath`` (the path library Orbax itself uses) for URLs and plain ``os`` calls for local paths.
Orbax writes the checkpoints itself (TensorStore for the arrays), the lease of the workdir has its own
GCS store in ``workdir_lock``, and TensorBoard's event files go through tensorboardX's GCS writer.

For ``gs://`` epath uses TensorFlow's file system when TensorFlow is installed, else fsspec's
``gcsfs``; ``google-cloud-storage`` serves the lease and TensorBoard. ``pip install
'consistency_jax[gcs]'`` installs both clients. Directory listings are not cached
(``use_listings_cache=False`` for fsspec's GCS): several clients and processes write the same
workdir, and a cached listing would hide their files (a checkpoint step, a TensorBoard file).

Object stores have no atomic rename and no append: ``write_text`` uploads the whole object (a single
upload is atomic: a reader sees the old or the new object, never half), and ``move`` copies then
deletes. On local paths ``write_text``/``write_bytes`` write a temporary file and rename it.
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import posixpath
import shutil
import uuid

SUPPORTED_SCHEMES = ("gs",)

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for ``scheme://…`` paths."""
    return "://" in os.fspath(path)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _configure_gcs() -> None:
    """Checks that a GCS client is installed and turns fsspec's listing cache off."""
    missing = [] if _installed("google.cloud.storage") else ["google-cloud-storage"]
    if not _installed("gcsfs") and not _installed("tensorflow"):
        missing.append("gcsfs")
    if missing:
        raise ValueError(
            f"gs:// paths need {' and '.join(missing)}: pip install "
            "'consistency_jax[gcs]' (or mount the bucket with gcsfuse and give the "
            "mounted path)."
        )
    if _installed("fsspec"):
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
    gcsfs_log = std_logging.getLogger("gcsfs")
    if gcsfs_log.level == std_logging.NOTSET:  # it logs every file it opens at INFO
        gcsfs_log.setLevel(std_logging.WARNING)


def resolve(path: PathLike, what: str = "workdir") -> str:
    """The absolute form of a local path, or a checked ``gs://bucket/path`` URL (no trailing '/').

    Raises:
      ValueError: an empty path, a scheme other than gs://, a URL without bucket, or gs:// without
        an installed GCS client (naming ``what``).
    """
    p = os.fspath(path)
    if not p:
        raise ValueError(f"The {what} is empty.")
    if not is_url(p):
        return os.path.abspath(os.path.expanduser(p))
    scheme, rest = p.split("://", 1)
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"{what} {p!r}: {scheme}:// is not supported (local paths and "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)} are). Mount the store "
            "and give the mounted path."
        )
    rest = rest.strip("/")
    if not rest or rest.startswith("/"):
        raise ValueError(f"{what} {p!r} names no bucket (expected gs://BUCKET/PATH).")
    _configure_gcs()
    return f"{scheme}://{posixpath.normpath(rest)}"


def join(base: PathLike, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def epath_of(path: PathLike):
    from etils import epath

    return epath.Path(os.fspath(path))


def exists(path: PathLike) -> bool:
    return epath_of(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
    return epath_of(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path: PathLike) -> None:
    """Creates ``path`` and its parents (on an object store: a directory marker, if any)."""
    if is_url(path):
        epath_of(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    """The names in directory ``path`` ([] when it does not exist)."""
    if is_url(path):
        p = epath_of(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def read_bytes(path: PathLike) -> bytes:
    """Raises FileNotFoundError when ``path`` does not exist."""
    if is_url(path):
        p = epath_of(path)
        if not p.exists():
            raise FileNotFoundError(os.fspath(path))
        return p.read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    """``read_bytes`` as UTF-8 text."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replaces ``path`` whole: readers see the old or the new content, never a part."""
    if is_url(path):
        epath_of(path).write_bytes(data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> None:
    """``write_bytes`` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def remove(path: PathLike) -> None:
    """Removes a file; a missing one is fine."""
    if is_url(path):
        p = epath_of(path)
        if p.exists():
            p.unlink()
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rmtree(path: PathLike) -> None:
    """Removes a directory tree; a missing one is fine."""
    if is_url(path):
        p = epath_of(path)
        if p.exists():
            p.rmtree()
        return
    shutil.rmtree(path, ignore_errors=True)


def move(src: PathLike, dst: PathLike) -> None:
    """Moves a file or directory tree (on an object store: each object copied, then deleted; an
    object store has no directories to create first)."""
    if is_url(src) or is_url(dst):
        s, d = epath_of(src), epath_of(dst)
        if s.is_dir():
            for child in list(s.iterdir()):
                move(child, d / child.name)
            if s.exists():  # a directory marker
                s.rmtree()
        else:
            s.copy(d)
            s.unlink()
    else:
        shutil.move(os.fspath(src), os.fspath(dst))
