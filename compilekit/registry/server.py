"""Start Debian's `docker-registry` (the CNCF distribution server) on 127.0.0.1 for tests and benchmarks.

With a config of our own: loopback only, a free port, filesystem storage in a directory we own, deletes
enabled. (The package's default config listens on all interfaces.)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

SERVER = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def available() -> bool:
    return Path(SERVER).exists()


class LocalRegistry:
    """`users`: {name: password} turns on htpasswd (Basic) auth (bcrypt hashes; needs the `bcrypt` package)."""

    def __init__(self, root: Path, users: dict[str, str] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\nlog: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: 127.0.0.1:{self.port}}}\n")
        if users:
            import bcrypt

            lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}" for u, p in users.items()]
            (root / "htpasswd").write_text("\n".join(lines) + "\n")
            with open(self.config, "a") as f:
                f.write(f"auth: {{htpasswd: {{realm: compilekit, path: {root / 'htpasswd'}}}}}\n")
        self.process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([SERVER, "serve", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        import requests

        for _ in range(100):
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("docker-registry did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"
