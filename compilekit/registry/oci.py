"""An artifact as an OCI image manifest: what `compilekit push` uploads and `compilekit pull` reads.

- `artifactType` application/vnd.compilekit.artifact.v1;
- config: the artifact's manifest.json (media type application/vnd.compilekit.config.v1+json), byte for
  byte as stored;
- one layer per file, typed by what it is (ONNX model, its external data, TensorRT engine, exported
  program, report, other), titled with `org.opencontainers.image.title` = its path in the artifact;
- annotations with what decides where it can run: backend, precision, onnxruntime / TensorRT version,
  compute capability, TensorRT hardware-compatibility level and version-compatible flag.

The manifest is serialised one way only (canonical JSON), so the same artifact always has the same
manifest digest, locally and in any registry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compilekit.artifact import MANIFEST, Artifact, canonical_json

ARTIFACT_TYPE = "application/vnd.compilekit.artifact.v1"
CONFIG_TYPE = "application/vnd.compilekit.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
_LAYER_TYPES = (  # (file name suffix, media type), first match wins
    (".onnx", "application/vnd.compilekit.onnx.model.v1"),
    (".onnx.data", "application/vnd.compilekit.onnx.data.v1"),
    (".engine", "application/vnd.compilekit.tensorrt.engine.v1"),
    (".pt2", "application/vnd.compilekit.exported-program.v1"),
    (".json", "application/vnd.compilekit.report.v1+json"),
)
OTHER_TYPE = "application/vnd.compilekit.file.v1"


def layer_type(path: str) -> str:
    return next((t for suffix, t in _LAYER_TYPES if path.endswith(suffix)), OTHER_TYPE)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    path: Path | None = None   # a file on disk, or
    data: bytes | None = None  # bytes in memory (config, manifest)
    title: str | None = None

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.title is not None:
            out["annotations"] = {TITLE: self.title}
        return out


@dataclass(frozen=True)
class Package:
    manifest: bytes
    digest: str
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def annotations(manifest: dict[str, Any]) -> dict[str, str]:
    """What decides compatibility, as OCI annotations (strings)."""
    target, build = manifest.get("target", {}), manifest.get("build", {})
    options = target.get("options", {})
    values = {
        "org.opencontainers.image.created": manifest.get("created"),
        "org.opencontainers.image.title": manifest.get("name"),
        "org.opencontainers.image.version": manifest.get("version"),
        "dev.compilekit.id": manifest.get("id"),
        "dev.compilekit.backend": target.get("backend"),
        "dev.compilekit.flavor": target.get("flavor"),
        "dev.compilekit.precision": (manifest.get("signature") or {}).get("precision"),
        "dev.compilekit.onnxruntime.version": target.get("onnxruntime"),
        "dev.compilekit.tensorrt.version": build.get("tensorrt") or target.get("tensorrt"),
        "dev.compilekit.cuda.compute-capability": build.get("compute_capability"),
        "dev.compilekit.tensorrt.hardware-compatibility": options.get("hardware_compatibility"),
        "dev.compilekit.tensorrt.version-compatible": options.get("version_compatible"),
        "dev.compilekit.stopped-after": manifest.get("stopped_after"),
        "dev.compilekit.ort.providers": ",".join(options.get("providers") or ["cpu"])
        if target.get("backend") == "onnxruntime" else None,
        "dev.compilekit.ort.int8-weights": build.get("int8_weights") if target.get("backend") == "onnxruntime" else None,
    }
    return {k: (json.dumps(v) if isinstance(v, bool) else str(v)) for k, v in values.items() if v is not None}


def package(artifact: Artifact) -> Package:
    """The OCI manifest, config and layers of a stored artifact (file digests from its manifest, which
    `Artifact.verify` has checked against the files)."""
    config_bytes = (artifact.path / MANIFEST).read_bytes()
    config = Blob(_digest(config_bytes), len(config_bytes), CONFIG_TYPE, data=config_bytes)
    layers = []
    for rel, digest in sorted(artifact.manifest["files"].items()):
        path = artifact.path / rel
        layers.append(Blob(digest, path.stat().st_size, layer_type(rel), path=path, title=rel))
    body = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ARTIFACT_TYPE,
            "config": config.descriptor(), "layers": [layer.descriptor() for layer in layers],
            "annotations": annotations(artifact.manifest)}
    data = canonical_json(body)
    return Package(data, _digest(data), config, tuple(layers))


def parse_manifest(data: bytes) -> dict[str, Any]:
    """An OCI manifest that holds a compilekit artifact; raises ArtifactError otherwise."""
    from compilekit.errors import ArtifactError

    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"the registry's manifest is not JSON: {exc}") from None
    if body.get("artifactType") != ARTIFACT_TYPE or body.get("config", {}).get("mediaType") != CONFIG_TYPE:
        raise ArtifactError(f"this OCI manifest is not a compilekit artifact (artifactType "
                            f"{body.get('artifactType')!r})", hint="push it with `compilekit push`")
    for layer in body.get("layers", []):
        title = (layer.get("annotations") or {}).get(TITLE, "")
        if not title or title.startswith("/") or ".." in Path(title).parts or title == MANIFEST:
            raise ArtifactError(f"layer {layer.get('digest')} has an unsafe or missing title {title!r}")
    return body
