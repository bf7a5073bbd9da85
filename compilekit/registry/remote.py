"""Push and pull artifacts over the OCI Distribution API v1.1, with a small client over `requests`.

(The OCI SDKs we looked at cannot set `artifactType` or keep our manifest bytes; the API is small.)

- Blobs: HEAD first, so blobs the registry has are skipped; a small blob goes up in one POST + PUT, a large
  one in PATCH chunks with Content-Range, then PUT with its digest.
- The manifest goes up last (PUT), and the registry's `Docker-Content-Digest` must equal ours.
- Pull streams each blob to a temporary file, hashing while it reads, refuses a mismatch, and renames.
- Connection errors and 5xx are retried with backoff, so a push that dies half way can simply be run again:
  blobs already there are skipped, the rest are uploaded, and the manifest goes up only when all are in.
- Auth: Basic, or a Bearer token from the registry's WWW-Authenticate challenge; credentials from
  COMPILEKIT_REGISTRY_USERNAME / _PASSWORD or a docker-style config.json. Plain HTTP only for loopback
  hosts, and only with --insecure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from compilekit.errors import ArtifactError, CompilekitError

from .oci import MANIFEST_TYPE, Blob, Package

CHUNK = 64 << 20          # PATCH size for large blobs
MONOLITHIC_MAX = 16 << 20  # blobs up to this go up in one request
_REF_RE = re.compile(r"^oci://(?P<host>[^/]+)/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)(?::(?P<tag>[\w][\w.-]{0,127}))?"
                     r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class RegistryError(CompilekitError):
    """A registry refused a request, or could not be reached."""


@dataclass(frozen=True)
class OciRef:
    host: str       # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> OciRef:
        m = _REF_RE.match(text.strip())
        if not m:
            raise ArtifactError(f"{text!r} is not an OCI reference",
                                hint="write oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], lower-case repository")
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def hostname(self) -> str:
        return self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host.split("]")[0] + "]"

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repository}" + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")


def _credentials(host: str) -> tuple[str, str] | None:
    user, password = os.environ.get("COMPILEKIT_REGISTRY_USERNAME"), os.environ.get("COMPILEKIT_REGISTRY_PASSWORD")
    if user and password:
        return user, password
    config = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key)
        if entry and entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryClient:
    def __init__(self, ref: OciRef, *, insecure: bool = False, retries: int = 6, backoff: float = 0.5) -> None:
        import requests

        if insecure and ref.hostname not in _LOOPBACK:
            raise ArtifactError(f"--insecure (plain HTTP) is for loopback registries only, not {ref.host}",
                                hint="use HTTPS for a remote registry")
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.host}"
        self.session = requests.Session()
        self.retries = retries
        self.backoff = backoff
        self._auth_header: str | None = None

    # ------------------------------------------------------------------------------------- plumbing
    def _url(self, path: str) -> str:
        return urljoin(self.base, path)

    def _request(self, method: str, url: str, *, ok: tuple[int, ...], data: bytes | None = None,
                 headers: dict[str, str] | None = None, stream: bool = False):
        import requests

        url = self._url(url)
        last: str = ""
        failures = challenges = 0
        while failures < self.retries:
            if failures:
                time.sleep(self.backoff * 2 ** (failures - 1))
            all_headers = dict(headers or {})
            if self._auth_header:
                all_headers["Authorization"] = self._auth_header
            try:
                response = self.session.request(method, url, data=data, headers=all_headers, stream=stream,
                                                timeout=(10, 300), allow_redirects=True)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last, failures = f"{type(exc).__name__}: {exc}", failures + 1
                continue
            if response.status_code == 401 and challenges < 2 and self._authenticate(response):
                challenges += 1
                continue  # answered the challenge: send again at once
            if response.status_code >= 500:
                last, failures = f"HTTP {response.status_code}: {response.text[:200]}", failures + 1
                continue
            if response.status_code not in ok:
                raise RegistryError(f"{method} {url} -> HTTP {response.status_code}: {response.text[:300]}",
                                    hint=self._hint(response.status_code))
            return response
        raise RegistryError(f"{method} {url} failed after {self.retries} tries: {last}",
                            hint="is the registry running and reachable? a push run again resumes: blobs already "
                                 "uploaded are skipped")

    def _hint(self, status: int) -> str | None:
        return {401: "set COMPILEKIT_REGISTRY_USERNAME / COMPILEKIT_REGISTRY_PASSWORD or log in with docker",
                403: "these credentials may not push to this repository",
                404: f"no such repository or tag in {self.ref.host}"}.get(status)

    def _authenticate(self, response) -> bool:
        """Answer a 401's challenge once per header value: Basic, or a Bearer token from its realm."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        creds = _credentials(self.ref.host)
        if scheme == "basic" and creds:
            header = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        elif scheme == "bearer" and params.get("realm"):
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            token = self.session.get(params["realm"], params=query, auth=creds, timeout=30)
            if token.status_code != 200:
                return False
            body = token.json()
            header = "Bearer " + (body.get("token") or body.get("access_token") or "")
        else:
            return False
        if header == self._auth_header:
            return False  # the same credentials were refused already
        self._auth_header = header
        return True

    # ---------------------------------------------------------------------------------------- blobs
    def has_blob(self, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", ok=(200, 404))
        return r.status_code == 200

    def upload(self, blob: Blob, progress: Callable[[int], None] | None = None) -> bool:
        """Upload one blob unless the registry has it; True if it was uploaded."""
        if self.has_blob(blob.digest):
            if progress:
                progress(blob.size)
            return False
        start = self._request("POST", f"/v2/{self.ref.repository}/blobs/uploads/", ok=(202,))
        location = start.headers["Location"]
        if blob.size <= MONOLITHIC_MAX:
            data = blob.data if blob.data is not None else blob.path.read_bytes()
            self._request("PUT", _with_digest(location, blob.digest), ok=(201,), data=data,
                          headers={"Content-Type": "application/octet-stream"})
            if progress:
                progress(blob.size)
            return True
        with open(blob.path, "rb") as f:
            offset = 0
            while offset < blob.size:
                chunk = f.read(CHUNK)
                end = offset + len(chunk) - 1
                r = self._request("PATCH", location, ok=(202,), data=chunk,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Range": f"{offset}-{end}", "Content-Length": str(len(chunk))})
                location = r.headers.get("Location", location)
                offset = end + 1
                if progress:
                    progress(len(chunk))
        self._request("PUT", _with_digest(location, blob.digest), ok=(201,), headers={"Content-Length": "0"})
        return True

    def download(self, digest: str, dest: Path, size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        """Stream a blob to `dest` through a temporary file, hashing as it reads; refuse a mismatch."""
        r = self._request("GET", f"/v2/{self.ref.repository}/blobs/{digest}", ok=(200,), stream=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pull-", dir=dest.parent)
        h, got = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                    got += len(chunk)
                    if progress:
                        progress(len(chunk))
            actual = f"sha256:{h.hexdigest()}"
            if actual != digest or (size is not None and got != size):
                raise ArtifactError(f"blob {digest} from {self.ref.host} is corrupt: its bytes hash to {actual} "
                                    f"({got} bytes)", hint="the registry's copy is damaged; push the artifact again")
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------------------------ manifests
    def put_manifest(self, data: bytes, digest: str, reference: str) -> None:
        r = self._request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}", ok=(201,), data=data,
                          headers={"Content-Type": MANIFEST_TYPE})
        returned = r.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise RegistryError(f"the registry stored the manifest as {returned}, not {digest}",
                                hint="it rewrote the manifest; this registry cannot hold compilekit artifacts as-is")

    def get_manifest(self) -> tuple[bytes, str]:
        r = self._request("GET", f"/v2/{self.ref.repository}/manifests/{self.ref.reference}", ok=(200,),
                          headers={"Accept": MANIFEST_TYPE})
        data = r.content
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if self.ref.digest and digest != self.ref.digest:
            raise ArtifactError(f"the manifest of {self.ref} hashes to {digest}", hint="the registry's copy is damaged")
        return data, digest


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + f"digest={digest}"


def push(pkg: Package, ref: OciRef, *, insecure: bool = False, progress: Callable[[int], None] | None = None
         ) -> dict[str, Any]:
    """Upload the package's blobs (skipping those present) and then its manifest under the ref's tag. A blob
    whose upload session the registry lost (restarted mid-upload) is uploaded again from its start."""
    client = RegistryClient(ref, insecure=insecure)
    uploaded = 0
    for blob in pkg.blobs:
        for attempt in range(3):
            try:
                uploaded += client.upload(blob, progress)
                break
            except RegistryError:
                if attempt == 2:
                    raise
    for attempt in range(3):
        try:
            client.put_manifest(pkg.manifest, pkg.digest, ref.tag or pkg.digest)
            break
        except RegistryError as exc:
            # Another push of the same blobs can make ours skip one (HEAD said present) that the registry
            # then does not link in time: seen with two pushes at once ("blob unknown to registry"). Check
            # every blob again, upload what is missing, and retry the manifest.
            if attempt == 2 or "blob unknown" not in str(exc).lower():
                raise
            time.sleep(0.5 * (attempt + 1))
            uploaded += sum(client.upload(blob) for blob in pkg.blobs)
    return {"digest": pkg.digest, "blobs": len(pkg.blobs), "uploaded": uploaded,
            "bytes": sum(b.size for b in pkg.blobs)}


def pull(ref: OciRef, store: Any, *, insecure: bool = False, force: bool = False,
         progress: Callable[[int, int], None] | None = None) -> tuple[Any, str]:
    """Download an artifact into `store` (a LocalStore): every blob hash-checked, the files committed
    atomically, and the stored id must be the id the config names. Returns (Artifact, manifest digest).
    An artifact that does not fit this machine (its annotations say why) is refused before any blob is
    downloaded, unless `force`."""
    from .compat import incompatibilities
    from .oci import TITLE, parse_manifest

    client = RegistryClient(ref, insecure=insecure)
    data, digest = client.get_manifest()
    body = parse_manifest(data)
    reasons = incompatibilities(body.get("annotations") or {})
    if reasons and not force:
        raise ArtifactError(f"{ref} does not fit this machine: " + "; ".join(reasons),
                            hint="pull it where it runs, or pass --force to download it anyway")
    total = sum(int(d.get("size", 0)) for d in [body["config"], *body.get("layers", [])])
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    with store.staging() as staged:
        config_path = staged.parent / f"{staged.name}.config.json"
        try:
            client.download(body["config"]["digest"], config_path, body["config"].get("size"), step)
            manifest = json.loads(config_path.read_bytes())
        finally:
            config_path.unlink(missing_ok=True)
        digests = {}
        for layer in body.get("layers", []):
            title = layer["annotations"][TITLE]
            client.download(layer["digest"], staged / title, layer.get("size"), step)  # hash-checked as written
            digests[title] = layer["digest"]
        artifact = store.commit(staged, {k: v for k, v in manifest.items() if k not in ("id", "files")},
                                digests=digests)
    if artifact.id != manifest.get("id") or artifact.manifest["files"] != manifest.get("files"):
        store.remove(artifact.id)
        raise ArtifactError(f"{ref} holds files that do not make up artifact {manifest.get('id')} (they make "
                            f"{artifact.id})", hint="the pushed artifact is inconsistent; push it again")
    return artifact, digest
