"""Stage 1, load: resolve MODEL (a local folder or a Hub repo id) and check that it is a supported family
(``families.FAMILIES``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ShortVError
from .families import FAMILIES
from .util import hub_offline, one_line

# What a conversion needs from a Hub repo: configs, tokenizer/processor files, chat template, safetensors.
PROCESSOR_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "README.md"]
HUB_PATTERNS = [*PROCESSOR_PATTERNS, "*.safetensors"]
# A processor needs an image processor config and a tokenizer; which files say so.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
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

    Raises ShortVError when it cannot be found or is not a supported family (``families.FAMILIES``) with safetensors.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        path, repo_id, files = local.resolve(), None, sorted(p.name for p in local.iterdir() if p.is_file())
    elif local.exists():
        raise ShortVError(f"{model} is a file; MODEL must be a checkpoint folder or a Hub repo id")
    elif _looks_local(model):
        raise ShortVError(f"{model}: no such folder{_nearby(local)}")
    else:
        path, files = _download(model, revision, config_only), None
        repo_id = model
    if files is None:
        local_listing = not config_only or hub_offline()
        files = sorted(p.name for p in path.iterdir() if p.is_file()) if local_listing else _hub_files(model, revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ShortVError(f"{model} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ShortVError(f"{config_file} is not valid JSON: {err}") from None
    source = Source(
        path=path,
        name=path.name if repo_id is None else Path(model.rstrip("/")).name,
        repo_id=repo_id,
        config=config,
        weights=[f for f in files if f.endswith(".safetensors")],
    )
    check_supported(source, files)
    if not config_only:
        check_weights(source)
    return source


def check_weights(source: Source) -> None:
    """Each safetensors file is whole: a header that parses and tensor data as long as the header says (reads the
    headers only). Raises ShortVError naming the file and what is wrong: before anything is written."""
    for name in source.weights:
        path = source.path / name
        if not path.is_file():
            raise ShortVError(f"{source.model_id}: weight file {name} is missing")
        size = path.stat().st_size
        problem = _safetensors_problem(path, size)
        if problem:
            raise ShortVError(f"{source.model_id}: weight file {name} {problem}; download or save it again")


def _safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with the safetensors file at ``path`` of ``size`` bytes, or None."""
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            return f"is not a safetensors file or is truncated ({size} bytes; its header cannot be read)"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            return "is not a safetensors file (its header does not parse)"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        return "is not a safetensors file (its header lists no tensor offsets)"
    if 8 + length + end > size:
        return f"is truncated: its header needs {8 + length + end} bytes, the file has {size}"
    return None


def load_processor(path: str | Path):
    """The checkpoint's processor (image processor, tokenizer, chat template), or a one-line ShortVError.

    Processors with a video processor (Qwen2-VL, LLaVA-OneVision, SmolVLM) need torchvision to load; without it,
    the same processor class is built without its video processor (images only, all calibration needs)."""
    from transformers import AutoProcessor
    from transformers.utils import logging

    _check_processor_packages(Path(path))
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # a ShortV folder's model type is not the processor's: a warning about nothing
    try:  # a stock processor class, never code from the folder (a ShortV folder's code is the model's only)
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # transformers raises many types here
        if importlib.util.find_spec("torchvision") is None:
            try:
                return image_only_processor(path)
            except Exception:
                pass
        raise ShortVError(f"the processor in {path} does not load: {one_line(err)}") from None
    finally:
        logging.set_verbosity(level)


def _check_processor_packages(path: Path) -> None:
    """The Python packages the family's processor imports (``Family.processor_needs``), named before it fails
    for want of them in a less telling way."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return
    family = FAMILIES.get(str(model_type).removeprefix("shortv_"))
    missing = [p for p in (family.processor_needs if family else ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ShortVError(f"{family.display}'s processor needs {', '.join(missing)}: pip install {' '.join(missing)}")


def image_only_processor(path: str | Path, name: str | None = None):
    """The checkpoint's processor class without its video processor: image processor, tokenizer, chat template
    and the processor's own settings from ``processor_config.json``."""
    import inspect

    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    settings_file = path / "processor_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    image_settings = settings.get("image_processor")
    if image_settings is None:  # saved on its own
        image_settings = json.loads((path / "preprocessor_config.json").read_text())
    image_class = image_settings["image_processor_type"]
    image_class = getattr(transformers, image_class.replace("Fast", "").replace("ImageProcessor", "ImageProcessorPil"))
    name = name or settings.get("processor_class")
    if name is None:
        raise ValueError(f"{path}: no processor_class")
    processor_class = pixtral_processor_class() if name == "PixtralProcessor" else image_only_processor_class(name)
    accepted = set(inspect.signature(processor_class.__init__).parameters) - {"self", "image_processor", "tokenizer"}
    kwargs = {k: v for k, v in settings.items() if k in accepted and not isinstance(v, dict)}
    template = path / "chat_template.jinja"
    if template.is_file():
        kwargs["chat_template"] = template.read_text()
    image_processor = image_class(**{k: v for k, v in image_settings.items() if k != "image_processor_type"})
    return processor_class(image_processor, AutoTokenizer.from_pretrained(path, trust_remote_code=False), **kwargs)


def pixtral_processor_class() -> type:
    """Mistral 3's PixtralProcessor where its module cannot import (it imports torchvision): the same hooks on
    transformers' processor machinery. Images are resized to multiples of patch x merge by the PIL image
    processor; each ``[IMG]`` of the prompt becomes, per row of merged patches, one ``[IMG]`` each and an
    ``[IMG_BREAK]``, the last one ``[IMG_END]``."""
    from transformers.processing_utils import ProcessorMixin

    class PixtralProcessor(ProcessorMixin):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            patch_size: int = 16,
            spatial_merge_size: int = 1,
            chat_template=None,
            image_token="[IMG]",
            image_break_token="[IMG_BREAK]",
            image_end_token="[IMG_END]",
            **kwargs,
        ):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)
            self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
            self.image_token = image_token
            self.image_break_token = image_break_token
            self.image_end_token = image_end_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

        def _process_images(self, images, **images_kwargs):
            images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
            return super()._process_images(images, **images_kwargs)

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            unit = self.patch_size * self.spatial_merge_size
            height, width = image_inputs["image_sizes"][image_idx]
            rows = [[self.image_token] * (width // unit) + [self.image_break_token]] * (height // unit)
            tokens = [token for row in rows for token in row]
            tokens[-1] = self.image_end_token
            return "".join(tokens)

        @property
        def model_input_names(self):
            return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]

    return PixtralProcessor


def image_only_processor_class(name: str) -> type:
    """transformers' processor class ``name`` with no video processor argument. It saves as ``name`` (the
    ``processor_class`` a machine with torchvision loads with AutoProcessor)."""
    import inspect
    from types import SimpleNamespace

    import transformers

    base = getattr(transformers, name)

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            if name == "SmolVLMProcessor":  # its chat template reads the video sampling defaults
                self.video_processor = SimpleNamespace(num_frames=None, fps=None)

    # the base's signature without video_processor: what the processor saves and which sub-processors it has
    signature = inspect.signature(base.__init__)
    params = [p for p in signature.parameters.values() if p.name != "video_processor"]
    ImageOnly.__init__.__signature__ = signature.replace(parameters=params)
    ImageOnly.__name__ = ImageOnly.__qualname__ = name
    return ImageOnly


def _looks_local(model: str) -> bool:
    """A path rather than a Hub id: not of the form name or owner/name, or its first part is a local folder
    (``examples/tiny-llava`` where ``examples/`` exists)."""
    if not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        return True
    return "/" in model and Path(model.split("/")[0]).is_dir()


def _nearby(path: Path) -> str:
    """'; did you mean ...' from the folders beside ``path``, when one is close."""
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" (and {parent} does not exist either)"
    folders = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, folders, n=1, cutoff=0.5)
    return f"; did you mean {parent / close[0]}?" if close else ""


def check_supported(source: Source, files: list[str]) -> None:
    model_type = source.config.get("model_type")
    if str(model_type).startswith("shortv_"):
        raise ShortVError(
            f"{source.model_id} is already a ShortV checkpoint "
            f"(shortv_layers={source.config.get('shortv_layers')}); convert its base model instead"
        )
    if model_type not in FAMILIES:
        raise ShortVError(
            f"{source.model_id}: unsupported architecture {model_type!r}; "
            f"shortv-export supports {', '.join(f'{k} ({f.display})' for k, f in FAMILIES.items())}"
        )
    text_type = source.hf_config.text_config.model_type
    supported_text = FAMILIES[model_type].text_models
    if text_type not in supported_text:
        raise ShortVError(
            f"{source.model_id}: unsupported language model {text_type!r} for {FAMILIES[model_type].display}; "
            f"supported: {', '.join(supported_text)}"
        )
    missing = [" or ".join(names) for names in (IMAGE_PROCESSOR_FILES, TOKENIZER_FILES) if not set(names) & set(files)]
    if missing:
        raise ShortVError(
            f"{source.model_id} has no processor: missing {'; '.join(missing)}. Calibration and the written "
            "checkpoint need the base model's image processor and tokenizer; copy them into the folder "
            "(e.g. from the Hub repo it came from)"
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
            f"{model} is not a local folder and the Hub cannot be reached ({one_line(err)}); "
            "check your connection or HF_HUB_OFFLINE, or pass a local folder"
        ) from None
    except EntryNotFoundError as err:
        raise ShortVError(f"{model}: {one_line(err)}") from None
    except HfHubHTTPError as err:
        raise ShortVError(f"{model}: the Hub answered {one_line(err)}") from None
    except OSError as err:  # connection errors surface as OSError subclasses
        raise ShortVError(f"{model}: could not reach the Hub ({one_line(err)})") from None


def _download(model: str, revision: str | None, config_only: bool) -> Path:
    """Fetch ``model`` (without its weights when ``config_only``). Offline, or with no route to the Hub, fail at
    once with the reason rather than after the client's retries."""
    from huggingface_hub import snapshot_download

    patterns = PROCESSOR_PATTERNS if config_only else HUB_PATTERNS
    if hub_offline():
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:
            raise ShortVError(
                f"{model} is not a local folder, offline mode is on (HF_HUB_OFFLINE=1) and the Hub cache has no "
                "copy of it: download it once online, or pass a local folder"
            ) from None
    _check_reachable(model)
    return Path(_hub_call(model, snapshot_download, model, revision=revision, allow_patterns=patterns))


def _check_reachable(model: str, timeout: float = 3.0) -> None:
    """Fail fast, with the reason, when the Hub endpoint's host cannot be resolved or connected to."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")
    if any(os.environ.get(name) for name in proxies):  # the route is the proxy's: let the client try it
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ShortVError(
            f"{model} is not a local folder and the Hub ({constants.ENDPOINT}) cannot be reached: "
            f"{err.strerror or err}. Check your connection, or pass a local folder (offline with a cached "
            "copy: HF_HUB_OFFLINE=1)"
        ) from None


def _hub_files(model: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    return sorted(_hub_call(model, HfApi().list_repo_files, model, revision=revision))
