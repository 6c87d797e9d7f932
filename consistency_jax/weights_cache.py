"""Weights that find themselves: published weight files fetched once into a cache and checked.

``fetch(PT_INCEPTION)`` returns the path of pytorch-fid's FID Inception weights in the cache
(``$CONSISTENCY_JAX_CACHE``, else ``~/.cache/consistency_jax``), downloading them on first use from
their canonical address with a progress bar. Every file is checked against the SHA-256 recorded here
(the hash prefix in the names of pytorch-fid's and torchvision's files, ``…-6726825d.pth``, is the
first 8 hex digits of it); the download is written to a temporary file beside the target and renamed
only once complete and verified, so an interrupted or corrupted download leaves nothing in the cache.
A cached file whose hash no longer matches is removed and fetched again.

``CONSISTENCY_JAX_OFFLINE=1`` forbids downloads: a file missing from the cache is then an error that
names the address, the cache path and the command that puts it there by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request

__all__ = [
    "ALEXNET",
    "CACHE_ENV",
    "LPIPS_LIN",
    "OFFLINE_ENV",
    "PT_INCEPTION",
    "VGG16",
    "RemoteFile",
    "WeightsUnavailableError",
    "cache_dir",
    "fetch",
    "file_sha256",
]

CACHE_ENV = "CONSISTENCY_JAX_CACHE"
OFFLINE_ENV = "CONSISTENCY_JAX_OFFLINE"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A published file: its name in the cache, its canonical address and its SHA-256."""

    name: str
    url: str
    sha256: str
    what: str = ""


# pytorch-fid's conversion of TF's 2015-12-05 Inception graph (the FID network); torch-fidelity
# publishes the same bytes as weights-inception-2015-12-05-6726825d.pth.
PT_INCEPTION = RemoteFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    "the FID Inception-v3 weights (pytorch-fid)",
)
# torchvision's IMAGENET1K_V1 backbones, the ones the lpips package loads.
VGG16 = RemoteFile(
    "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    "torchvision's VGG16 ImageNet weights (the LPIPS backbone)",
)
ALEXNET = RemoteFile(
    "alexnet-owt-7be5be79.pth",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
    "torchvision's AlexNet ImageNet weights (the LPIPS backbone)",
)
# The lpips package's v0.1 linear heads (Zhang et al. 2018), at a fixed revision of its repository.
_LPIPS_REVISION = "082bb24f84c091ea94de2867d34c4544f68e0963"
LPIPS_LIN = {
    net: RemoteFile(
        f"lpips-v0.1-{net}.pth",
        "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
        f"{_LPIPS_REVISION}/lpips/weights/v0.1/{net}.pth",
        sha,
        f"the LPIPS v0.1 linear heads for {net}",
    )
    for net, sha in (
        ("vgg", "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
        ("alex", "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
    )
}


class WeightsUnavailableError(ValueError):
    """A weight file that is not in the cache and could not be fetched, or failed its check."""


def cache_dir() -> str:
    """``$CONSISTENCY_JAX_CACHE``, else ``~/.cache/consistency_jax``."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "consistency_jax"
    )


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual(remote: RemoteFile, target: str) -> str:
    return (
        f"To fetch it by hand: curl -L --create-dirs -o {target} {remote.url} (then its SHA-256 "
        f"must be {remote.sha256}); or set ${CACHE_ENV} to a directory that holds {remote.name}."
    )


def _download(remote: RemoteFile, target: str, *, progress: bool, timeout: float) -> None:
    """Downloads ``remote`` to ``target`` through a temporary file beside it, checking its length
    and SHA-256 before the rename; on any failure nothing is left behind."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{remote.name}.", suffix=".part", dir=folder)
    try:
        h = hashlib.sha256()
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = None
            if progress:
                try:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=total, unit="B", unit_scale=True, desc=f"Downloading {remote.name}"
                    )
                except ImportError:
                    bar = None
            try:
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise WeightsUnavailableError(
                f"The download of {remote.url} stopped after {received} of {total} bytes; "
                f"nothing was kept in {folder}. Try again. " + _manual(remote, target)
            )
        digest = h.hexdigest()
        if digest != remote.sha256:
            raise WeightsUnavailableError(
                f"{remote.url} has SHA-256 {digest}, not {remote.sha256}: refused, and nothing "
                f"was kept in {folder} (a corrupted download, or a file changed at its source)."
            )
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def fetch(
    remote: RemoteFile,
    *,
    cache: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> str:
    """The path of ``remote`` in the cache, downloaded and checked first if it is not there.

    Args:
      remote: the file (``PT_INCEPTION``, ``VGG16``, ``ALEXNET``, ``LPIPS_LIN[net]``).
      cache: the cache directory (default ``cache_dir()``).
      progress: show a progress bar (tqdm) while downloading.
      timeout: seconds without an answer before a download is given up.

    Raises:
      WeightsUnavailableError: offline (no network, or ``$CONSISTENCY_JAX_OFFLINE``), an
        interrupted download, or a file whose SHA-256 is not the recorded one; the message names
        the address, the cache path and the command that fetches it by hand. Nothing partial or
        unverified is left in the cache.
    """
    folder = os.path.abspath(cache or cache_dir())
    target = os.path.join(folder, remote.name)
    if os.path.isfile(target):
        if file_sha256(target) == remote.sha256:
            return target
        os.remove(target)  # damaged since: fetched again below
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsUnavailableError(
            f"{remote.what or remote.name} is not in the cache ({target}) and "
            f"${OFFLINE_ENV} forbids downloading it from {remote.url}. " + _manual(remote, target)
        )
    try:
        _download(remote, target, progress=progress, timeout=timeout)
    except WeightsUnavailableError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        # offline, refused, an HTTP error, or a connection closed mid-body
        raise WeightsUnavailableError(
            f"Could not download {remote.what or remote.name} from {remote.url} into the cache "
            f"({target}): {type(e).__name__}: {e}. " + _manual(remote, target)
        ) from None
    return target
