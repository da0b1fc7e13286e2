"""A trained model is a folder: weights, a card (``card.json``) and its description (``MODEL_CARD.md``).

As StarDist / CSBDeep keep config, weights and thresholds together, the card says what the model
is (name, version, architecture and its config, classes), what it reads and writes (inputs and
outputs with shapes; ``-1`` is the batch axis), how its inputs are computed (``input_spec``), how it
was made (command, seed, commit, data sizes, time) and how well it did (test figures). Loading
checks the card's format, the model's name and version, the input shapes the caller will feed,
and the files' SHA-256, and fails with a message that says which.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["CARD_FORMAT_VERSION", "source_commit", "ModelCard", "ModelFolder", "ModelLoadError", "TensorSpec", "load_model_folder", "sha256_file"]

CARD_FORMAT_VERSION = 1


class ModelLoadError(ValueError):
    """A model folder cannot be used; the message says which file or field and why."""


class TensorSpec(BaseModel):
    """One input or output: its name, shape (``-1`` for the batch axis) and dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: list[int]
    dtype: Literal["float32", "float16", "int64"] = "float32"


class ModelCard(BaseModel):
    """The machine-readable model card (``card.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format: Literal["scopestream-model-card"] = "scopestream-model-card"
    format_version: int = CARD_FORMAT_VERSION
    name: str = Field(description="Model name, e.g. 'motion'.")
    version: str = Field(description="Semantic version of the weights, e.g. '1.0.0'.")
    task: str = Field("", description="What it predicts.")
    architecture: str = Field(description="Registry name of the network (scopestream.models.create_model).")
    architecture_config: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    classes: list[str] = Field(default_factory=list)
    input_spec: dict[str, Any] = Field(default_factory=dict, description="How the inputs are computed.")
    feature_names: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(description="Role ('onnx', 'torch') -> file name in the folder.")
    sha256: dict[str, str] = Field(default_factory=dict, description="File name -> SHA-256.")
    training: dict[str, Any] = Field(default_factory=dict, description="Command, seed, commit, data sizes, time.")
    test: dict[str, Any] = Field(default_factory=dict, description="Test figures.")


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder."""

    path: Path
    card: ModelCard

    def file(self, role: str) -> Path:
        """Path of the file with ``role`` ('onnx', 'torch')."""
        try:
            return self.path / self.card.files[role]
        except KeyError:
            raise ModelLoadError(
                f"model {self.card.name} {self.card.version} in {self.path} has no {role!r} file "
                f"(files: {sorted(self.card.files)})"
            ) from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model_folder(
    path: str | Path,
    *,
    name: str,
    major_version: int,
    inputs: Mapping[str, Sequence[int]] | None = None,
    feature_names: Sequence[str] | None = None,
) -> ModelFolder:
    """Read and check a model folder.

    Parameters
    ----------
    path
        The folder holding ``card.json`` and the weights.
    name
        The model name the caller expects.
    major_version
        The major version the caller's code can feed (a different major version means different
        inputs or classes).
    inputs
        Input name -> shape the caller will feed (batch axis ``-1``); each must match the card.
    feature_names
        The feature names the caller computes, in order; must equal the card's.

    Raises
    ------
    ModelLoadError
        Naming the folder and what is wrong: missing folder or card, invalid card, another model
        or version, other input shapes or features, a missing or altered weights file.
    """
    folder = Path(path)
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise ModelLoadError(f"no model card {card_path} (is {folder} a model folder? weights missing?)")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelLoadError(f"invalid model card {card_path}: {exc}") from None
    if card.format_version != CARD_FORMAT_VERSION:
        raise ModelLoadError(f"{card_path}: card format version {card.format_version}, this code reads {CARD_FORMAT_VERSION}")
    if card.name != name:
        raise ModelLoadError(f"{card_path}: the folder holds model {card.name!r}, expected {name!r}")
    try:
        major = int(card.version.split(".")[0])
    except ValueError:
        raise ModelLoadError(f"{card_path}: version {card.version!r} is not MAJOR.MINOR.PATCH") from None
    if major != major_version:
        raise ModelLoadError(
            f"{card_path}: model {card.name} version {card.version} has major version {major}; this code "
            f"feeds version {major_version}.x (retrain with `scopestream train {name}` or use matching weights)"
        )
    declared = {t.name: list(t.shape) for t in card.inputs}
    for input_name, shape in (inputs or {}).items():
        if input_name not in declared:
            raise ModelLoadError(f"{card_path}: the model has no input {input_name!r} (inputs: {sorted(declared)})")
        if list(shape) != declared[input_name]:
            raise ModelLoadError(
                f"{card_path}: input {input_name!r} has shape {declared[input_name]}, the caller feeds {list(shape)}"
            )
    if feature_names is not None and list(feature_names) != card.feature_names:
        raise ModelLoadError(
            f"{card_path}: the model was trained on features {card.feature_names}, this code computes "
            f"{list(feature_names)}"
        )
    for role, filename in card.files.items():
        file_path = folder / filename
        if not file_path.is_file():
            raise ModelLoadError(f"{card_path}: {role} weights file {file_path} is missing")
        expected = card.sha256.get(filename)
        if expected and sha256_file(file_path) != expected:
            raise ModelLoadError(f"{card_path}: {file_path} does not match the card's SHA-256 (altered or truncated)")
    return ModelFolder(folder, card)


def source_commit() -> str:
    """HEAD of the checkout this code runs from, with ``+dirty`` when tracked files have uncommitted
    changes, or ``unknown`` outside a git checkout: the card's ``commit``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
