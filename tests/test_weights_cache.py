"""Weights that find themselves (``consistency_jax.weights_cache``), against a local HTTP server.

The server (http.server in a thread, on 127.0.0.1 only; no other network) serves a fixture file
and can corrupt it or close the connection mid-body; it counts the requests it answers.
"""

import hashlib
import http.server
import os
import threading

import numpy as np
import pytest

from consistency_jax import torch_pickle, weights_cache

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


class _Server:
    def __init__(self, body: bytes):
        self.body, self.mode, self.hits = body, "ok", 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's name
                server.hits += 1
                body = server.body
                if server.mode == "corrupt":
                    body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
                if server.mode == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "cut":  # half the body, then the connection closes
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights.pth"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served():
    body = open(os.path.join(FIXTURES, "torch", "zip.pt"), "rb").read()
    server = _Server(body)
    remote = weights_cache.RemoteFile(
        "fixture-weights.pth", server.url, hashlib.sha256(body).hexdigest(), "the fixture"
    )
    yield server, remote
    server.close()


@pytest.fixture(autouse=True)
def _no_offline(monkeypatch):
    monkeypatch.delenv(weights_cache.OFFLINE_ENV, raising=False)


def test_first_use_downloads_and_verifies_then_the_cache_is_read(served, tmp_path, monkeypatch):
    server, remote = served
    monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "cache"))
    path = weights_cache.fetch(remote, progress=False)
    assert path == str(tmp_path / "cache" / remote.name) and server.hits == 1
    assert weights_cache.file_sha256(path) == remote.sha256
    assert os.listdir(tmp_path / "cache") == [remote.name]  # no temporary file left
    got = torch_pickle.read_state_dict(path)
    assert np.array_equal(
        got["float32"],
        torch_pickle.read_state_dict(os.path.join(FIXTURES, "torch", "zip.pt"))["float32"],
    )
    server.close()  # the second use does not need the server
    assert weights_cache.fetch(remote, progress=False) == path and server.hits == 1


def test_a_damaged_cached_file_is_fetched_again(served, tmp_path):
    server, remote = served
    path = weights_cache.fetch(remote, cache=str(tmp_path), progress=False)
    with open(path, "r+b") as f:
        f.write(b"XX")
    assert weights_cache.fetch(remote, cache=str(tmp_path), progress=False) == path
    assert server.hits == 2 and weights_cache.file_sha256(path) == remote.sha256


def test_a_corrupted_download_or_a_wrong_hash_is_refused_and_leaves_no_file(served, tmp_path):
    server, remote = served
    server.mode = "corrupt"
    with pytest.raises(weights_cache.WeightsUnavailableError, match="has SHA-256 .* not "):
        weights_cache.fetch(remote, cache=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []
    server.mode = "ok"
    wrong = weights_cache.RemoteFile(remote.name, remote.url, "0" * 64)
    with pytest.raises(weights_cache.WeightsUnavailableError, match=f"not {'0' * 64}: refused"):
        weights_cache.fetch(wrong, cache=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == [] and server.hits == 2


def test_an_interrupted_download_leaves_no_partial_file(served, tmp_path):
    server, remote = served
    server.mode = "cut"
    with pytest.raises(weights_cache.WeightsUnavailableError) as e:
        weights_cache.fetch(remote, cache=str(tmp_path), progress=False)
    assert remote.url in str(e.value) and os.listdir(tmp_path) == []


def test_offline_the_error_names_the_url_the_cache_path_and_the_manual_command(
    served, tmp_path, monkeypatch
):
    server, remote = served
    server.close()  # nothing listens there any more: offline
    target = str(tmp_path / remote.name)
    with pytest.raises(weights_cache.WeightsUnavailableError) as e:
        weights_cache.fetch(remote, cache=str(tmp_path), progress=False, timeout=5)
    message = str(e.value)
    assert remote.url in message and target in message
    assert f"curl -L --create-dirs -o {target} {remote.url}" in message
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv(weights_cache.OFFLINE_ENV, "1")  # no attempt at all
    with pytest.raises(weights_cache.WeightsUnavailableError, match="forbids downloading"):
        weights_cache.fetch(remote, cache=str(tmp_path), progress=False)


def test_an_http_error_is_refused_with_the_url(served, tmp_path):
    server, remote = served
    server.mode = "missing"
    with pytest.raises(weights_cache.WeightsUnavailableError, match="404"):
        weights_cache.fetch(remote, cache=str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []


def test_the_recorded_hashes_agree_with_the_published_file_names():
    """pytorch-fid's and torchvision's names carry the first 8 hex digits of the SHA-256."""
    for remote in (weights_cache.PT_INCEPTION, weights_cache.VGG16, weights_cache.ALEXNET):
        prefix = os.path.splitext(remote.name)[0].rsplit("-", 1)[1]
        assert remote.sha256.startswith(prefix) and len(remote.sha256) == 64
        assert remote.url.endswith("/" + remote.name)
    assert all(len(r.sha256) == 64 for r in weights_cache.LPIPS_LIN.values())


def test_lpips_weights_find_themselves(tmp_path, monkeypatch):
    """``load_lpips_params(None, net)`` fetches the backbone and the linear heads (served here as
    torch zip files written by ``torch_pickle.write_state_dict``) and gives the parameters of the
    same tensors written to a .safetensors file."""
    from consistency_jax.metrics import lpips

    shapes = lpips.lpips_tensor_shapes("alex")
    rng = np.random.default_rng(0)
    backbone = {
        k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items() if k.startswith("feat")
    }
    backbone["classifier.1.weight"] = np.zeros((4, 4), np.float32)  # dropped
    lin = {
        k.replace(".weight", ".model.1.weight"): rng.uniform(size=v).astype(np.float32)
        for k, v in shapes.items()
        if k.startswith("lin")
    }
    servers = {}
    for name, state in (("backbone", backbone), ("lin", lin)):
        torch_pickle.write_state_dict(tmp_path / f"{name}.pth", state)
        body = (tmp_path / f"{name}.pth").read_bytes()
        servers[name] = _Server(body)
        sha = hashlib.sha256(body).hexdigest()
        remote = weights_cache.RemoteFile(f"{name}-test.pth", servers[name].url, sha)
        if name == "backbone":
            monkeypatch.setattr(weights_cache, "ALEXNET", remote)
        else:
            monkeypatch.setattr(weights_cache, "LPIPS_LIN", {"alex": remote})
    monkeypatch.setenv(weights_cache.CACHE_ENV, str(tmp_path / "cache"))
    try:
        params = lpips.load_lpips_params(None, net="alex")
        again = lpips.load_lpips_params("", net="alex")
    finally:
        for s in servers.values():
            s.close()
    assert servers["backbone"].hits == 1 and servers["lin"].hits == 1  # the second from the cache
    tensors = lpips.build_lpips_tensors(backbone, lin, shapes)
    lpips.save_lpips_safetensors(tensors, tmp_path / "alex.safetensors", "alex")
    want = lpips.load_lpips_params(tmp_path / "alex.safetensors", net="alex")
    import jax

    for a, b, c in zip(
        jax.tree.leaves(params), jax.tree.leaves(again), jax.tree.leaves(want), strict=True
    ):
        assert np.array_equal(a, c) and np.array_equal(b, c)
