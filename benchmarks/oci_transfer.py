"""Push and pull throughput of one large blob against a local OCI registry, next to a plain file copy on the
same disk (the ceiling: the registry stores blobs on that disk too).

Starts Debian's docker-registry on 127.0.0.1 (compilekit.registry.server), stores an artifact holding one
file of random bytes, then times, in this order: `shutil.copyfile` of the file, `compilekit push` (first
time: every byte goes up, in 64 MiB chunks), a second push (every blob already there: HEADs only), and
`compilekit pull` into an empty store (streamed, hash-checked). Usage:

    .venv/bin/python benchmarks/oci_transfer.py [--size-mb 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    from compilekit.registry import LocalStore
    from compilekit.registry.oci import package
    from compilekit.registry.remote import OciRef, pull, push
    from compilekit.registry.server import LocalRegistry, available

    if not available():
        raise SystemExit("needs Debian's docker-registry (apt-get install docker-registry)")
    size = args.size_mb << 20
    with tempfile.TemporaryDirectory(prefix="compilekit-oci-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        server = LocalRegistry(root / "server")
        server.start()
        try:
            store = LocalStore(root / "store")
            with store.staging() as staged:
                with open(staged / "model.onnx.data", "wb") as f:
                    for _ in range(size // (16 << 20)):
                        f.write(os.urandom(16 << 20))
                manifest = {"name": "bench", "version": "1", "recipe": {}, "source": {}, "toolchain": {},
                            "signature": {}, "target": {"backend": "onnxruntime"}, "status": "passed",
                            "created": "2026-11-28T00:00:00+00:00"}
                artifact = store.commit(staged, manifest)
            rows = []
            start = time.perf_counter()
            shutil.copyfile(artifact.path / "model.onnx.data", root / "copy.bin")
            os.sync()
            rows.append(("file copy (same disk)", time.perf_counter() - start))
            ref = OciRef.parse(f"oci://{server.host}/bench/blob:v1")
            pkg = package(artifact)
            start = time.perf_counter()
            push(pkg, ref, insecure=True)
            rows.append(("push (all blobs new)", time.perf_counter() - start))
            start = time.perf_counter()
            push(pkg, ref, insecure=True)
            rows.append(("push again (blobs present)", time.perf_counter() - start))
            start = time.perf_counter()
            pull(ref, LocalStore(root / "pulled"), insecure=True)
            rows.append(("pull into an empty store", time.perf_counter() - start))
        finally:
            server.kill()
    base = rows[0][1]
    print(f"{size / 2**20:.0f} MiB blob, registry on 127.0.0.1 (same disk)")
    print(f"{'':28s} {'seconds':>8s} {'MiB/s':>8s} {'x copy time':>11s}")
    for name, seconds in rows:
        print(f"{name:28s} {seconds:8.2f} {size / 2**20 / seconds:8.0f} {seconds / base:11.2f}")


if __name__ == "__main__":
    main()
