"""push / pull against a real OCI registry: Debian's `docker-registry` (the CNCF distribution server), started
on 127.0.0.1 with a config of our own. Round trip byte for byte, a chunked 200 MB blob, a registry killed and
restarted in the middle of a push, a corrupt blob refused on pull, and two pushes of one artifact at once."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from compilekit.cli import cli
from compilekit.errors import ArtifactError
from compilekit.registry import LocalStore
from compilekit.registry.oci import ARTIFACT_TYPE, TITLE, package
from compilekit.registry.remote import OciRef, pull, push
from compilekit.registry.server import LocalRegistry, available



def _need_server() -> None:
    if not available():
        reason = "Debian's docker-registry is not installed (`apt-get install docker-registry`; ./dev test installs it)"
        if os.environ.get("COMPILEKIT_REQUIRE_REGISTRY"):
            pytest.fail(reason + " and COMPILEKIT_REQUIRE_REGISTRY is set (CI)")
        pytest.skip(reason)


@pytest.fixture
def registry(tmp_path):
    _need_server()
    server = LocalRegistry(tmp_path / "server")
    server.start()
    yield server
    server.kill()


def _artifact(store: LocalStore, files: dict[str, bytes | int]):
    """A stored artifact with the given files (bytes, or a size for a file of random bytes)."""
    with store.staging() as staged:
        for rel, content in files.items():
            path = staged / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, int):
                with open(path, "wb") as f:
                    for _ in range(content // (1 << 24)):
                        f.write(os.urandom(1 << 24))
                    f.write(os.urandom(content % (1 << 24)))
            else:
                path.write_bytes(content)
        manifest = {"name": "blobs", "version": "1", "recipe": {}, "source": {}, "toolchain": {}, "signature": {},
                    "target": {"backend": "onnxruntime"}, "created": "2026-11-28T00:00:00+00:00", "status": "passed"}
        return store.commit(staged, manifest)


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_compiled_artifact_round_trip(registry, tiny_recipe, tmp_path):
    from compilekit.compile import compile_recipe
    from compilekit.recipe import load_recipe

    store = LocalStore(tmp_path / "a")
    artifact = compile_recipe(load_recipe(tiny_recipe()), registry=store.root).artifact
    dest = f"oci://{registry.host}/models/tiny:latest"
    out = CliRunner().invoke(cli, ["push", artifact.id, dest, "--registry", str(store.root), "--insecure"])
    assert out.exit_code == 0, out.output
    digest = out.stdout.strip().splitlines()[-1]
    assert digest == package(artifact).digest
    local = [e["digest"] for e in store.index()["manifests"] if e["annotations"]["dev.compilekit.id"] == artifact.id]
    assert local == [digest]  # the local OCI layout holds the very manifest bytes the registry got
    # The registry holds our manifest bytes, with the artifact type and one titled layer per file.
    manifest = requests.get(f"http://{registry.host}/v2/models/tiny/manifests/latest",
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert sorted(layer["annotations"][TITLE] for layer in manifest["layers"]) == sorted(artifact.manifest["files"])
    assert manifest["annotations"]["dev.compilekit.backend"] == "onnxruntime"
    # Pull into an empty store: same id, same manifest digest, the same bytes.
    other = LocalStore(tmp_path / "b")
    out = CliRunner().invoke(cli, ["pull", dest, "--registry", str(other.root), "--insecure"])
    assert out.exit_code == 0, out.output
    pulled = other.resolve(artifact.id)
    assert _same_files(artifact.path, pulled.path)
    assert package(pulled).digest == digest and other.index()["manifests"][0]["digest"] == digest
    # Pushing again uploads nothing: every blob is there.
    again = push(package(artifact), OciRef.parse(dest), insecure=True)
    assert again["uploaded"] == 0


def test_large_blob_goes_up_in_chunks_and_comes_back(registry, tmp_path, monkeypatch):
    import compilekit.registry.remote as remote

    calls = []
    real = remote.RegistryClient._request

    def counting(self, method, url, **kwargs):
        calls.append(method)
        return real(self, method, url, **kwargs)

    monkeypatch.setattr(remote.RegistryClient, "_request", counting)
    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.onnx.data": 200 << 20, "model.onnx": b"small"})
    ref = OciRef.parse(f"oci://{registry.host}/models/big:v1")
    push(package(artifact), ref, insecure=True)
    assert calls.count("PATCH") == -(-(200 << 20) // remote.CHUNK)
    pulled, _ = pull(ref, LocalStore(tmp_path / "b"), insecure=True)
    assert _same_files(artifact.path, pulled.path)


def test_push_survives_a_registry_restart(registry, tmp_path):
    """The registry is killed after the first chunk of a large blob and comes back a second later: the
    push retries, re-uploads what the registry lost, and finishes; the pull is intact."""
    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.engine": 150 << 20})
    ref = OciRef.parse(f"oci://{registry.host}/models/restart:v1")
    killed = []

    def progress(n):
        if not killed:
            killed.append(n)
            registry.kill()
            threading.Timer(1.0, registry.start).start()

    push(package(artifact), ref, insecure=True, progress=progress)
    assert killed
    pulled, _ = pull(ref, LocalStore(tmp_path / "b"), insecure=True)
    assert _same_files(artifact.path, pulled.path)


def test_pull_refuses_a_corrupt_blob(registry, tmp_path):
    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.onnx": b"x" * 4096, "report.json": b"{}"})
    ref = OciRef.parse(f"oci://{registry.host}/models/corrupt:v1")
    push(package(artifact), ref, insecure=True)
    blob = registry.blob_path(artifact.manifest["files"]["model.onnx"])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    other = LocalStore(tmp_path / "b")
    with pytest.raises(ArtifactError, match="corrupt"):
        pull(ref, other, insecure=True)
    assert other.list() == [] and not any(p.is_file() for p in other.root.rglob("*"))  # nothing half-written


def test_two_pushes_of_one_artifact_at_once(registry, tmp_path):
    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.onnx.data": 40 << 20, "model.onnx": b"graph"})
    ref = OciRef.parse(f"oci://{registry.host}/models/twice:v1")
    results, errors = [], []

    def run():
        try:
            results.append(push(package(artifact), ref, insecure=True))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0]["digest"] == results[1]["digest"]
    pulled, digest = pull(ref, LocalStore(tmp_path / "b"), insecure=True)
    assert digest == results[0]["digest"] and _same_files(artifact.path, pulled.path)


def test_a_manifest_refused_over_an_unknown_blob_is_retried_after_the_blobs(registry, tmp_path, monkeypatch):
    """What two pushes at once can cause: the manifest PUT finds a blob the registry has not linked yet. The
    push checks every blob again (uploading what is missing) and retries; any other refusal is final."""
    from compilekit.registry import remote

    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.onnx": b"graph", "weights.bin": 4096})
    ref = OciRef.parse(f"oci://{registry.host}/models/retry:v1")
    real_put, real_upload, calls = remote.RegistryClient.put_manifest, remote.RegistryClient.upload, []

    def put(self, data, digest, reference):
        calls.append("put")
        if calls.count("put") == 1:
            raise remote.RegistryError('PUT .../manifests/v1 -> HTTP 400: {"errors":[{"code":"MANIFEST_BLOB_UNKNOWN",'
                                       '"message":"blob unknown to registry"}]}')
        return real_put(self, data, digest, reference)

    def upload(self, blob, progress=None):
        calls.append("upload")
        return real_upload(self, blob, progress)

    monkeypatch.setattr(remote.RegistryClient, "put_manifest", put)
    monkeypatch.setattr(remote.RegistryClient, "upload", upload)
    pkg = package(artifact)
    result = push(pkg, ref, insecure=True)
    n = len(pkg.blobs)
    assert calls == ["upload"] * n + ["put"] + ["upload"] * n + ["put"]
    assert result["uploaded"] == n  # the second round found every blob present
    pulled, _ = pull(ref, LocalStore(tmp_path / "b"), insecure=True)
    assert _same_files(artifact.path, pulled.path)

    calls.clear()
    monkeypatch.setattr(remote.RegistryClient, "put_manifest",
                        lambda self, *a: (_ for _ in ()).throw(remote.RegistryError("HTTP 400: MANIFEST_INVALID")))
    with pytest.raises(remote.RegistryError, match="MANIFEST_INVALID"):
        push(pkg, ref, insecure=True)
    assert calls == ["upload"] * n  # no retry for another refusal


def test_references_and_insecure_rules():
    ref = OciRef.parse("oci://127.0.0.1:5000/models/minilm:latest")
    assert (ref.host, ref.repository, ref.tag) == ("127.0.0.1:5000", "models/minilm", "latest")
    assert OciRef.parse("oci://r.example.com/a/b@sha256:" + "0" * 64).reference == "sha256:" + "0" * 64
    with pytest.raises(ArtifactError, match="not an OCI reference"):
        OciRef.parse("https://r.example.com/a")
    from compilekit.registry.remote import RegistryClient

    with pytest.raises(ArtifactError, match="loopback"):
        RegistryClient(OciRef.parse("oci://r.example.com/a:b"), insecure=True)


def test_compile_push_uploads_only_after_the_gates(registry, tiny_recipe, tmp_path):
    dest = f"oci://{registry.host}/models/tiny:ci"
    store = tmp_path / "a"
    out = CliRunner().invoke(cli, ["compile", str(tiny_recipe()), "--registry", str(store), "--push", dest, "--insecure"])
    assert out.exit_code == 0, out.output
    local = LocalStore(store).list()[0]
    pulled, digest = pull(OciRef.parse(dest), LocalStore(tmp_path / "b"), insecure=True)
    assert pulled.id == local.id and digest == package(local).digest and _same_files(local.path, pulled.path)
    # A failed gate pushes nothing.
    failing = tiny_recipe({"verify": {"accuracy": {"gates": {"max_abs": 1e-15}}}, "artifact": {"version": "9.9.9"}})
    out = CliRunner().invoke(cli, ["compile", str(failing), "--registry", str(store), "--push",
                                   f"oci://{registry.host}/models/tiny:failed", "--insecure"])
    assert out.exit_code == 3
    assert requests.head(f"http://{registry.host}/v2/models/tiny/manifests/failed").status_code == 404


def test_an_engine_artifact_is_refused_where_tensorrt_is_missing(registry, tmp_path):
    """A TensorRT engine built elsewhere: pull refuses it before downloading any blob (its annotations say
    why), --force downloads it, and loading it refuses too."""
    from compilekit.compile import load_artifact
    from compilekit.targets.tensorrt import missing_requirements

    if not missing_requirements():
        pytest.skip("TensorRT and a GPU are present here: the refusal cannot be shown")
    store = LocalStore(tmp_path / "a")
    with store.staging() as staged:
        (staged / "model.engine").write_bytes(b"plan" * 1000)
        manifest = {"name": "engine", "version": "1", "recipe": {}, "source": {}, "toolchain": {}, "signature": {},
                    "target": {"backend": "tensorrt", "options": {"hardware_compatibility": "none"}},
                    "build": {"tensorrt": "10.15.1", "compute_capability": "9.0"}, "status": "passed",
                    "created": "2026-11-28T00:00:00+00:00"}
        artifact = store.commit(staged, manifest)
    ref = OciRef.parse(f"oci://{registry.host}/models/engine:v1")
    push(package(artifact), ref, insecure=True)
    other = LocalStore(tmp_path / "b")
    with pytest.raises(ArtifactError, match="does not fit this machine: it is a TensorRT engine"):
        pull(ref, other, insecure=True)
    assert not (other.root / "sha256").exists() or not any((other.root / "sha256").iterdir())
    pulled, _ = pull(ref, other, insecure=True, force=True)
    with pytest.raises(ArtifactError, match="does not fit this machine"):
        load_artifact(pulled.id, registry=other.root)


def test_oras_pulls_what_we_push(registry, tmp_path):
    """Another OCI client (oras-py) reads our artifact: every layer lands under its title, byte for byte."""
    import oras.client

    store = LocalStore(tmp_path / "a")
    artifact = _artifact(store, {"model.onnx": b"graph" * 100, "model.onnx.data": 3 << 20, "tokenizer/vocab.txt": b"a\nb"})
    ref = OciRef.parse(f"oci://{registry.host}/models/oras:v1")
    push(package(artifact), ref, insecure=True)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    out = tmp_path / "oras"
    client.pull(target=f"{registry.host}/models/oras:v1", outdir=str(out))
    for rel in artifact.manifest["files"]:
        assert (out / rel).read_bytes() == (artifact.path / rel).read_bytes(), rel


def test_basic_auth_from_the_environment_and_docker_config(tmp_path, monkeypatch):
    """A registry with htpasswd auth: no credentials is a clear 401 error; credentials from the environment,
    or from a docker-style config.json, answer the Basic challenge."""
    import base64
    import json

    from compilekit.registry.remote import RegistryError

    _need_server()
    pytest.importorskip("bcrypt", reason="the test registry's htpasswd file needs bcrypt (a test extra)")
    server = LocalRegistry(tmp_path / "server", users={"alice": "s3cret"})
    server.start()
    try:
        store = LocalStore(tmp_path / "a")
        artifact = _artifact(store, {"model.onnx": b"graph"})
        ref = OciRef.parse(f"oci://{server.host}/team/model:v1")
        monkeypatch.delenv("COMPILEKIT_REGISTRY_USERNAME", raising=False)
        monkeypatch.delenv("COMPILEKIT_REGISTRY_PASSWORD", raising=False)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
        with pytest.raises(RegistryError, match="401") as info:
            push(package(artifact), ref, insecure=True)
        assert "COMPILEKIT_REGISTRY_USERNAME" in info.value.hint
        monkeypatch.setenv("COMPILEKIT_REGISTRY_USERNAME", "alice")
        monkeypatch.setenv("COMPILEKIT_REGISTRY_PASSWORD", "s3cret")
        assert push(package(artifact), ref, insecure=True)["uploaded"] == 2
        monkeypatch.delenv("COMPILEKIT_REGISTRY_USERNAME")
        monkeypatch.delenv("COMPILEKIT_REGISTRY_PASSWORD")
        (tmp_path / "docker").mkdir()
        auth = base64.b64encode(b"alice:s3cret").decode()
        (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {server.host: {"auth": auth}}}))
        pulled, _ = pull(ref, LocalStore(tmp_path / "b"), insecure=True)
        assert _same_files(artifact.path, pulled.path)
    finally:
        server.kill()


def test_bearer_token_challenge(tmp_path, monkeypatch):
    """A registry that answers 401 with a Bearer challenge: the client fetches a token from the realm (with the
    scope the challenge names and the configured credentials) and retries with it. A small stand-in server:
    the distribution server needs a signing token service for this, which the tests do not run."""
    import base64
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: dict[str, list] = {"token_requests": [], "authorized": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/token"):
                seen["token_requests"].append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"token": "t0ken"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.headers.get("Authorization") != "Bearer t0ken":
                self.send_response(401)
                self.send_header("WWW-Authenticate", f'Bearer realm="http://{host}/token",service="test",'
                                 'scope="repository:team/model:pull"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            seen["authorized"].append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("COMPILEKIT_REGISTRY_USERNAME", "bob")
        monkeypatch.setenv("COMPILEKIT_REGISTRY_PASSWORD", "pw")
        from compilekit.registry.remote import RegistryClient

        client = RegistryClient(OciRef.parse(f"oci://{host}/team/model:v1"), insecure=True)
        assert client.has_blob("sha256:" + "0" * 64) is False  # 404 after authenticating
        (path, auth), = seen["token_requests"]
        assert "scope=repository%3Ateam%2Fmodel%3Apull" in path and "service=test" in path
        assert auth == "Basic " + base64.b64encode(b"bob:pw").decode()
        assert seen["authorized"] == ["/v2/team/model/blobs/sha256:" + "0" * 64]
    finally:
        server.shutdown()
