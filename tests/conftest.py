from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

warnings.filterwarnings("ignore", message=".*torchvision.*")
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (pytest -n): each its own dynamic-module cache (read
    # at import) and one thread (the tiny models are Python-bound: workers, not threads, use the cores)
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix=f"hf-modules-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from shortv_export.data import NESTED_IMAGES  # noqa: E402
from shortv_export.tiny import NEW_FAMILIES, save_tiny  # noqa: E402

_ROOT: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _tiny_root(tmp_path_factory):
    global _ROOT
    _ROOT = tmp_path_factory.mktemp("tiny")
    yield


@pytest.fixture(scope="session", autouse=True)
def _onnx_function_table_once():
    """torch.onnx.export builds its table of ATen-to-ONNX functions anew on every call (1 to 2 s: onnxscript reads
    the source of some 500 functions each time), and a worker exports some 30 graphs: the table is built once per
    worker here. The same table: an export changes it only for a custom translation table, which the tool never
    passes. Where torch's private module differs, nothing is patched."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    build = _registration.ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(build, classmethod):
        yield
        return
    tables = {}

    def once(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in tables:
            tables[key] = build.__func__(cls, *args, **kwargs)
        return tables[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(once)
    yield
    _registration.ONNXRegistry.from_torchlib = build


@cache
def tiny_dir(kind: str, num_layers: int = 6, text: str = "llama", kv_heads: int = 2) -> Path:
    """A tiny random checkpoint folder of ``kind`` ('llava', 'llava_next' or one of ``tiny.NEW_FAMILIES``) with
    text model ``text`` (one of ``tiny.TEXT_KINDS``; the new families' own) and ``kv_heads`` key/value heads (of
    4), saved once per session."""
    name = f"{kind}-{text}-{num_layers}" + ("" if kv_heads == 2 else f"-kv{kv_heads}")
    if kind in NEW_FAMILIES:
        text = None if text in ("llama", "qwen2", "gemma3") else text
    return save_tiny(_ROOT / name, kind, num_layers=num_layers, text=text, kv_heads=kv_heads)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(processor, text: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, rows: list[tuple[str, list[Image.Image]]], padding_side: str = "left") -> dict:
    """Processor inputs for rows of (question, images); rows may have zero, one or several images."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(processor, q, len(imgs)) for q, imgs in rows]
    if type(processor).__name__ in NESTED_IMAGES:  # images listed per row
        images = [imgs for _, imgs in rows] if any(imgs for _, imgs in rows) else None
    else:
        images = [img for _, imgs in rows for img in imgs] or None
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def processor_for(folder: Path):
    """The checkpoint's processor as the tool loads it (without torchvision: the same processor class without its
    video processor, or for Mistral 3 load.pixtral_processor_class)."""
    from shortv_export.load import load_processor

    return load_processor(folder)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest -n --dist loadgroup, the ONNX tests that share one export (test_onnx.py's ``exported``, cached
    per worker) run on one worker, so no model is exported twice; a test may name its group itself (the families
    sharing one fresh process in test_remote_code.py). Those groups
    run first, the largest first: the short single tests then fill both workers to the end, where a group left for
    last would keep one worker busy minutes after the other is done."""
    groups = {}
    for item in items:
        marker = item.get_closest_marker("xdist_group")
        if marker is None and item.module.__name__ == "test_onnx" and "exported" in item.fixturenames:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            group = f"onnx-{params.get('kind', 'llava')}-{params.get('text', 'llama')}"
            group += f"-{params['prune']}" if params.get("prune") else ""
            item.add_marker(pytest.mark.xdist_group(group))
        elif marker is not None:
            group = marker.kwargs.get("name", marker.args[0] if marker.args else None)
        else:
            continue
        groups[item.nodeid] = group
    sizes = Counter(groups.values())
    items.sort(key=lambda item: (item.nodeid not in groups, -sizes[groups.get(item.nodeid)]))  # stable otherwise


def pytest_configure(config):
    config.addinivalue_line("markers", "fresh_verify: verification reloads the folder in a real fresh process")
    config.addinivalue_line(
        "markers",
        "newest_only: runs on the newest transformers only (CI's lowest-version pass, -m 'not newest_only', skips it: "
        "README Versions)",
    )


NEWEST_ONLY = pytest.mark.newest_only


def also_lowest(cases: list[tuple], lowest, ids: list[str]) -> list:
    """``cases`` as ``pytest.param``s, those for which ``lowest(case)`` is false marked ``newest_only``: a family
    matrix whose every case runs on the newest transformers and a subset (one model per text-decoder class, say)
    on the lowest too."""
    return [pytest.param(*c, id=i, marks=() if lowest(c) else NEWEST_ONLY) for c, i in zip(cases, ids, strict=True)]


_FORK_SERVER = None


def fork_server():
    """This worker's fork server (tests/fork_server.py), started on first use."""
    global _FORK_SERVER
    if _FORK_SERVER is None:
        from fork_server import ForkServer

        from shortv_export.families import FAMILIES, LLAMA_LIKE

        types = [*LLAMA_LIKE, "gemma3", *(f.model_type for f in FAMILIES.values())]
        modules = [f"transformers.models.{t}.modeling_{t}" for t in dict.fromkeys(types)]
        _FORK_SERVER = ForkServer(modules, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""))
    return _FORK_SERVER


@pytest.fixture(autouse=True)
def _verification_forks(request, monkeypatch):
    """Verification's fresh process forked from a warm one (tests/fork_server.py) unless the test is marked
    ``fresh_verify``: the same code, arguments and environment, without 6.5 s of imports each time."""
    if request.node.get_closest_marker("fresh_verify") is None:
        from shortv_export import verify

        monkeypatch.setattr(verify, "run_user_code", fork_server().run)
    yield


def pytest_sessionfinish(session):
    if _FORK_SERVER is not None:
        _FORK_SERVER.close()
