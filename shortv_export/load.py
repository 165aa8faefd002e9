"""Stage 1, load: resolve MODEL (a local folder or a Hub repo id) and check that it is a supported LLaVA."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ShortVError
from .models import SUPPORTED, SUPPORTED_TEXT

# What a conversion needs from a Hub repo: configs, tokenizer/processor files, chat template, safetensors.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "README.md"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class Source:
    """A resolved base checkpoint."""

    path: Path  # local folder with config.json (and, unless resolved with config_only, the weights)
    name: str  # model name, e.g. "llava-1.5-7b-hf"
    repo_id: str | None  # Hub id when MODEL was one
    config: dict[str, Any] = field(repr=False)
    weights: list[str] = field(default_factory=list)  # safetensors files (names relative to the repo)

    @property
    def kind(self) -> str:
        return self.config["model_type"]

    @cached_property
    def hf_config(self):
        """The config parsed by the stock transformers class (fills in the defaults llava-hf configs rely on)."""
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.kind].from_dict(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.text_config.num_hidden_layers)

    @property
    def model_id(self) -> str:
        return self.repo_id or str(self.path)


def resolve_model(model: str, *, revision: str | None = None, config_only: bool = False) -> Source:
    """Find MODEL, download it if it is a Hub id (only configs with ``config_only``), and check it.

    Raises ShortVError when it cannot be found or is not a LLaVA / LLaVA-NeXT checkpoint with safetensors.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        path, repo_id, files = local.resolve(), None, sorted(p.name for p in local.iterdir() if p.is_file())
    elif local.exists():
        raise ShortVError(f"{model} is a file; MODEL must be a checkpoint folder or a Hub repo id")
    elif _REPO_ID.match(model) and not model.startswith((".", "/", "~")):
        path, files = _download(model, revision, config_only), None
        repo_id = model
    else:
        raise ShortVError(f"{model}: no such folder, and not a Hub repo id")
    if files is None:
        files = _hub_files(model, revision) if config_only else sorted(p.name for p in path.iterdir() if p.is_file())
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShortVError(f"{model} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ShortVError(f"{config_file} is not valid JSON: {err}") from None
    source = Source(
        path=path,
        name=Path(model.rstrip("/")).name,
        repo_id=repo_id,
        config=config,
        weights=[f for f in files if f.endswith(".safetensors")],
    )
    check_supported(source, files)
    return source


def check_supported(source: Source, files: list[str]) -> None:
    model_type = source.config.get("model_type")
    if model_type in ("shortv_llava", "shortv_llava_next"):
        raise ShortVError(
            f"{source.model_id} is already a ShortV checkpoint "
            f"(shortv_layers={source.config.get('shortv_layers')}); convert its base model instead"
        )
    if model_type not in SUPPORTED:
        raise ShortVError(
            f"{source.model_id}: unsupported architecture {model_type!r}; "
            f"shortv-export supports {', '.join(SUPPORTED)} (LLaVA-1.5 and LLaVA-NeXT)"
        )
    text = source.config.get("text_config") or {}
    text_type = text.get("model_type", "llama")
    if text_type not in SUPPORTED_TEXT:
        raise ShortVError(
            f"{source.model_id}: unsupported language model {text_type!r}; supported: {', '.join(SUPPORTED_TEXT)}"
        )
    if not source.weights:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise ShortVError(
            f"{source.model_id} has no safetensors weights{found}; shortv-export only copies "
            "safetensors, never pickle files: convert the checkpoint to safetensors first"
        )


def _hub_call(model: str, fn, *args, **kwargs):
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fn(*args, **kwargs)
    except GatedRepoError:
        raise ShortVError(f"{model} is gated: accept its license on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ShortVError(f"{model}: no such folder, and no such Hub repo (or it is private: log in first)") from None
    except RevisionNotFoundError:
        raise ShortVError(f"{model}: revision {kwargs.get('revision')!r} not found on the Hub") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise ShortVError(
            f"{model} is not a local folder and the Hub cannot be reached ({_short(err)}); "
            "check your connection or HF_HUB_OFFLINE, or pass a local folder"
        ) from None
    except EntryNotFoundError as err:
        raise ShortVError(f"{model}: {_short(err)}") from None
    except HfHubHTTPError as err:
        raise ShortVError(f"{model}: the Hub answered {_short(err)}") from None
    except OSError as err:  # connection errors surface as OSError subclasses
        raise ShortVError(f"{model}: could not reach the Hub ({_short(err)})") from None


def _download(model: str, revision: str | None, config_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json"] if config_only else HUB_PATTERNS
    return Path(_hub_call(model, snapshot_download, model, revision=revision, allow_patterns=patterns))


def _hub_files(model: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    return sorted(_hub_call(model, HfApi().list_repo_files, model, revision=revision))


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."
