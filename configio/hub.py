"""Hugging Face conventions for our models: `save_pretrained` / `from_pretrained` / `push_to_hub`, safetensors only.

`HubModel` is huggingface_hub's `PyTorchModelHubMixin` (config.json from the model's one `config` dataclass,
model.safetensors, a model card) with two guarantees a training pipeline needs on top:
- saving is atomic per file and the weights land last, so a folder whose model.safetensors exists is complete
  (a make target can depend on it), and files get the user's normal permissions; a failed write is one
  `WriteFailed` naming the file and the OS's reason, leaving the earlier files as they were;
- loading a local folder never touches the network and fails with one `CheckpointError` line that names the
  folder and the fix (missing folder, missing or corrupt config, weights that do not fit the config).
A name that is not a local path is a Hub repository id, loaded by huggingface_hub as usual.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE

from .errors import CheckpointError, ConfigError
from .files import TEMPORARY_SUFFIX, remove_orphans, replace_files_from, reporting_write_failures

WEIGHTS_NAME = SAFETENSORS_SINGLE_FILE  # "model.safetensors"
T = TypeVar("T", bound="HubModel")


def _is_local(name: str | os.PathLike) -> bool:
    """A Path, an existing path, or anything but the `namespace/name` form of a Hub repository id is local."""
    text = os.fspath(name)
    return isinstance(name, os.PathLike) or os.path.exists(text) or text.startswith((".", "/", "~")) \
        or text.count("/") != 1


class HubModel(PyTorchModelHubMixin):
    """Mix into an `nn.Module` whose `__init__` takes one `config` dataclass (see the module docstring)."""

    what: str = "model"  # for messages: "tokenizer", "prior"
    make_hint: str = "train one first or check the path"

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write config.json, a model card and model.safetensors (last) into `save_directory`."""
        push = kwargs.pop("push_to_hub", False)
        final = Path(save_directory)
        with reporting_write_failures(final):
            final.mkdir(parents=True, exist_ok=True)
            remove_orphans(final)
            staging = Path(tempfile.mkdtemp(dir=final, prefix=".export.", suffix=TEMPORARY_SUFFIX))
        try:
            with reporting_write_failures(final, staging=staging):
                super().save_pretrained(staging, **kwargs)
            replace_files_from(staging, final, last=(WEIGHTS_NAME,))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push:
            repo_id = kwargs.pop("repo_id", None) or final.name
            self.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k not in ("config", "model_card_kwargs")})

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, **kwargs: Any) -> T:
        name = pretrained_model_name_or_path
        if not _is_local(name):
            return super().from_pretrained(name, **kwargs)
        folder = Path(name)
        if not folder.is_dir():
            raise CheckpointError(f"no {cls.what} at '{folder}' (no such folder); {cls.make_hint}")
        for required in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / required).is_file():
                raise CheckpointError(f"no {cls.what} at '{folder}' ({required} missing); {cls.make_hint}")
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{cls.what} config '{folder / CONFIG_NAME}' is corrupt (not valid JSON); "
                                  f"{cls.make_hint}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{cls.what} config '{folder / CONFIG_NAME}' is corrupt (not a JSON object of "
                                  f"settings); {cls.make_hint}")
        try:
            model = super().from_pretrained(folder, **kwargs)
        except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as err:
            raise CheckpointError(f"{cls.what} config '{folder / CONFIG_NAME}' is invalid: {err}") from None
        return model.eval()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, map_location: str = "cpu", strict: bool = True,
                         **model_kwargs: Any):
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, token=token, local_files_only=local_files_only)
        model = cls(**model_kwargs)
        device = torch.device(map_location)
        try:
            load_model(model, weights, strict=True, device="cpu" if device.type == "cpu" else str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{cls.what} weights '{weights}' are corrupt or not a safetensors file ({err})") from None
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(f"{cls.what} weights '{weights}' do not match its config ({detail})") from None
        return model
