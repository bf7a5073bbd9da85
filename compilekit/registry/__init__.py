"""Artifact registries: where compiled artifacts are stored and found."""

from __future__ import annotations

from compilekit.registry.local import LocalStore, default_store_path

__all__ = ["LocalStore", "default_store_path"]
