"""Typed errors. A user's mistake is a `CompilekitError`; the CLI prints it without a traceback."""

from __future__ import annotations


class CompilekitError(Exception):
    """A problem the user can fix. `hint` says how."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(CompilekitError):
    """The recipe file is malformed or names something that does not exist."""


class ModelSourceError(CompilekitError):
    """The model named by the recipe cannot be loaded."""


class ExportError(CompilekitError):
    """torch.export failed on the model."""


class PassError(CompilekitError):
    """A pass failed, or left the program broken."""


class LoweringError(CompilekitError):
    """The program could not be lowered to the target."""


class ArtifactError(CompilekitError):
    """An artifact is missing, corrupt, or cannot be written."""


class VerificationError(CompilekitError):
    """Verification could not run (bad checking data, missing tokenizer, ...)."""


class InputShapeError(CompilekitError):
    """Inputs fed to a program do not fit the shapes and dim ranges it was exported for."""


class GateFailure(Exception):
    """An accuracy or latency gate failed. Not a user error: exit code 3."""

    exit_code = 3

    def __init__(self, message: str, manifest: dict | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest


class TargetUnavailable(CompilekitError):
    """The recipe's target cannot run on this machine (no TensorRT, no GPU)."""
