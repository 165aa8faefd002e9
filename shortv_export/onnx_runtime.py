"""Run an exported ShortV checkpoint with ONNX Runtime: numpy and onnxruntime (or onnxruntime-gpu) only.

    from transformers import AutoProcessor
    from shortv_export.onnx_runtime import ShortVOnnxModel

    model = ShortVOnnxModel.from_pretrained("llava-1.5-7b-hf-shortv-n19", provider="cuda")
    processor = AutoProcessor.from_pretrained("llava-1.5-7b-hf-shortv-n19")
    inputs = processor(images=image, text=prompt, return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=32)        # prompt + new tokens, like HF generate (greedy)
    ids = model.generate(**inputs, do_sample=True, temperature=0.7, top_p=0.9, seed=0)   # seeded sampling

Decoding keeps the KV cache where the provider computes it: with IO binding (the default) the decoder's
``present.*`` outputs stay ORT values on the device and are bound as the next step's ``past_key_values.*``, so
only the last position's logits come back to the host each step. The graphs and their inputs are documented in
``onnx/shortv_onnx.json`` (see `shortv_export.onnx_export`). This module must not import torch: deployments
that use it may not have it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .families import FAMILIES

SPEC_FILE = "shortv_onnx.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NUMPY = {"float32": np.float32, "float16": np.float16}


class ShortVOnnxModel:
    """The three ShortV graphs of one export, plus the LLaVA glue around them (image placement, anyres packing,
    positions, the text-row index, the KV cache and greedy decoding)."""

    def __init__(self, folder: Path, spec: dict, sessions: dict, generation: dict, io_binding: bool = True):
        self.folder = folder
        self.spec = spec
        self.vision, self.embed, self.decoder = sessions["vision"], sessions["embed"], sessions["decoder"]
        self._decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        self.io_binding = io_binding
        provider = self.decoder.get_providers()[0]
        self.device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.dtype = _NUMPY[spec["dtype"]]
        self.image_token_id = spec["image_token_id"]
        self.generation = generation  # the checkpoint's generation config: defaults for generate()
        self.eos_token_id = generation.get("eos_token_id")
        self.pad_token_id = generation.get("pad_token_id")

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, provider: str | list = "cpu", session_options=None, io_binding: bool = True
    ):
        """Load ``folder`` (a checkpoint with ``onnx/``, or the ``onnx`` folder itself). ``provider``: "cpu",
        "cuda", "tensorrt", an ONNX Runtime provider name, or a list of them (tried in order). ``io_binding``:
        keep the KV cache on the device between decode steps (False: numpy in, numpy out every step)."""
        import onnxruntime as ort

        folder = Path(folder)
        onnx_dir = folder / "onnx" if (folder / "onnx" / SPEC_FILE).exists() else folder
        if not (onnx_dir / SPEC_FILE).exists():
            raise FileNotFoundError(f"no ONNX export in {folder}: expected onnx/{SPEC_FILE} (export with --onnx)")
        spec = json.loads((onnx_dir / SPEC_FILE).read_text())
        wanted = [provider] if isinstance(provider, str) else list(provider)
        providers = [PROVIDERS.get(p.lower(), p) if isinstance(p, str) else p for p in wanted]
        available = ort.get_available_providers()
        missing = [p for p in providers if (p if isinstance(p, str) else p[0]) not in available]
        if missing:
            raise ValueError(
                f"ONNX Runtime provider {missing[0]} is not available here (available: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA"
            )
        sessions = {
            key: ort.InferenceSession(str(onnx_dir / spec[name]["file"]), session_options, providers=providers)
            for key, name in (("vision", "vision_encoder"), ("embed", "embed_tokens"), ("decoder", "decoder"))
        }
        return cls(onnx_dir, spec, sessions, _generation_defaults(onnx_dir), io_binding)

    # -- pieces ----------------------------------------------------------------------------------------------

    def image_features(
        self, pixel_values, image_sizes=None, pixel_attention_mask=None, image_grid_thw=None
    ) -> list[np.ndarray]:
        """One [tokens, hidden] array per image (Idefics3 / SmolVLM: per tile), in the order the image tokens
        appear."""
        pixel_values = np.asarray(pixel_values, dtype=self.dtype)
        if _graph_kind(self.spec) == "tiled":
            return self._tile_features(pixel_values, pixel_attention_mask)
        if _graph_kind(self.spec) == "mrope":
            return self._patch_features(pixel_values, image_grid_thw)
        if self.spec["model_type"] != "llava_next":
            (features,) = self.vision.run(None, {"pixel_values": pixel_values})
            return list(features)
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them)")
        image_sizes = np.asarray(image_sizes).tolist()
        grid, tile = self.spec["image_grid_pinpoints"], self.spec["vision_image_size"]
        counts = [image_size_to_num_patches(size, grid, tile) for size in image_sizes]
        if pixel_values.ndim == 5:  # [images, max tiles, 3, H, W], padded: keep each image's own tiles
            pixel_values = np.concatenate([pix[:n] for pix, n in zip(pixel_values, counts, strict=True)])
        features, newline = self.vision.run(None, {"pixel_values": pixel_values})
        starts = np.cumsum([0] + counts)
        side = tile // self.spec["vision_patch_size"]
        return [
            pack_anyres(features[a:b], size, grid, tile, side, newline)
            for a, b, size in zip(starts[:-1], starts[1:], image_sizes, strict=True)
        ]

    def _tile_features(self, pixel_values, pixel_attention_mask) -> list[np.ndarray]:
        """Idefics3 / SmolVLM: ``pixel_values`` [rows, max tiles, 3, H, W] as the processor pads them; padding
        tiles (all zero) are dropped, as the model drops them, and each real tile gives its [tokens, hidden]."""
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if pixel_attention_mask is None:
            masks = np.ones((len(tiles), *tiles.shape[-2:]), dtype=bool)
        else:
            masks = np.asarray(pixel_attention_mask, dtype=bool).reshape(-1, *tiles.shape[-2:])
        real = (tiles != 0).reshape(len(tiles), -1).any(-1)
        if not real.any():
            return []
        (features,) = self.vision.run(None, {"pixel_values": tiles[real], "pixel_attention_mask": masks[real]})
        return list(features)

    def _patch_features(self, pixel_values, image_grid_thw) -> list[np.ndarray]:
        """Qwen2-VL / Qwen2.5-VL: ``pixel_values`` [patches, C*T*p*p] and ``image_grid_thw`` [images, 3] -> one
        [tokens, hidden] array per image, the window order and masks computed here (``qwen_vision_inputs``)."""
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL / Qwen2.5-VL need image_grid_thw (the processor returns it)")
        spec, grid = self.spec, np.asarray(image_grid_thw).tolist()
        feeds = qwen_vision_inputs(grid, spec["spatial_merge_size"], spec["window_size"], spec["patch_size"])
        (features,) = self.vision.run(None, {"pixel_values": pixel_values, **feeds})
        counts = [t * h * w // spec["spatial_merge_size"] ** 2 for t, h, w in grid]
        return np.split(features, np.cumsum(counts)[:-1])

    def prefill_inputs(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        pixel_attention_mask=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
    ) -> dict:
        """The decoder's feeds for a prompt batch (empty cache). Qwen2-VL / Qwen2.5-VL take ``image_grid_thw`` and
        ``mm_token_type_ids`` too (as their processor returns them), for the vision inputs and 3-D positions."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        (embeds,) = self.embed.run(None, {"input_ids": input_ids})
        visual = input_ids == self.image_token_id
        if pixel_values is not None:
            features = self.image_features(pixel_values, image_sizes, pixel_attention_mask, image_grid_thw)
            features = np.concatenate(features) if features else np.zeros((0, embeds.shape[-1]), self.dtype)
            if len(features) != int(visual.sum()):
                raise ValueError(f"image tokens: {int(visual.sum())}, image features: {len(features)}")
            embeds[visual] = features  # row-major order, like masked_scatter
        elif visual.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        batch = input_ids.shape[0]
        if _graph_kind(self.spec) == "mrope":
            types = visual.astype(np.int64) if mm_token_type_ids is None else mm_token_type_ids
            grid = [] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()
            position_ids = rope_index(types, attention_mask, grid, self.spec["spatial_merge_size"])
        else:
            position_ids = np.where(attention_mask == 0, 0, np.cumsum(attention_mask, axis=1) - 1)
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids.astype(np.int64),
            "text_index": text_index(visual),
        }
        prune = self.spec.get("shortv_prune")
        if prune:  # FastV / VTW: which rows are visual, how many each keeps; the pruned layers hold nothing yet
            feeds.update(visual_mask=visual, kept_valid=kept_slots(visual, prune.get("ratio")))
            feeds["pruned_past_mask"] = np.zeros((batch, 0), np.int64)
        return feeds | self.empty_cache(batch)

    def step_inputs(self, embeds, attention_mask, position_ids, cache: dict) -> dict:
        """The decoder's feeds for a decode step: new (text) tokens' ``embeds`` after the feeds ``cache`` that the
        previous call returned (`decode`)."""
        batch, seq = embeds.shape[:2]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "text_index": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
        }
        if self.spec.get("shortv_prune"):  # every new token is text, and kept
            feeds.update(visual_mask=np.zeros((batch, seq), bool), kept_valid=np.ones((batch, seq), bool))
        return feeds | cache

    def empty_cache(self, batch: int) -> dict:
        spec = self.spec
        shape = (batch, spec["num_key_value_heads"], 0, spec["head_dim"])
        empty = np.zeros(shape, self.dtype)
        return {f"past_key_values.{i}.{kv}": empty for i in range(spec["num_layers"]) for kv in ("key", "value")}

    def decode(self, feeds: dict) -> tuple[np.ndarray, np.ndarray, dict]:
        """One decoder call: (logits of the last position [B, V], last hidden states, the next cache feeds).
        Feeds are numpy arrays or ORT values; with IO binding the returned cache feeds are ORT values on the
        device (``.numpy()`` copies one to the host) and the hidden states are left there (None)."""
        if not self.io_binding:
            outputs = self.decoder.run(None, feeds)
            return outputs[0][:, -1], outputs[1], _next_feeds(self._decoder_outputs, outputs)
        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")  # [B, 1, V]: the one output that comes back to the host
        for name in self._decoder_outputs[1:]:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1], None, _next_feeds(self._decoder_outputs, outputs)

    # -- generation ------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_sizes=None,
        pixel_attention_mask=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding, or sampling with ``do_sample`` (``temperature``, then ``top_k``, then ``top_p``, as
        transformers' warpers apply them; ``seed`` makes it reproducible). Left as None, the sampling settings come
        from the checkpoint's generation_config.json, else transformers' defaults (no sampling, temperature 1,
        top_k 50, top_p 1), as HF generate does. Stops a row at any of ``eos_token_id`` (default: the generation
        config's); returns [batch, prompt + new] token ids, finished rows padded with ``pad_token_id``, like HF
        generate. Any other argument is an error, not silently ignored."""
        g = self.generation
        do_sample = g.get("do_sample", False) if do_sample is None else do_sample
        temperature = g.get("temperature", 1.0) if temperature is None else temperature
        top_k = g.get("top_k", 50) if top_k is None else top_k
        top_p = g.get("top_p", 1.0) if top_p is None else top_p
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        rng = np.random.default_rng(seed)
        feeds = self.prefill_inputs(
            input_ids,
            attention_mask,
            pixel_values,
            image_sizes,
            pixel_attention_mask,
            image_grid_thw,
            mm_token_type_ids,
        )
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = feeds["attention_mask"]
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        eos = np.array([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=np.int64)
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if len(eos) else 0)
        unfinished = np.ones(len(ids), dtype=bool)
        positions = feeds["position_ids"][..., -1:]  # [B, 1], or [3, B, 1] for M-RoPE
        for _ in range(max_new_tokens):
            logits, _, cache = self.decode(feeds)
            if do_sample:
                token = sample(logits, rng, temperature, top_k, top_p)
            else:
                token = logits.argmax(-1)
            token = np.where(unfinished, token, pad)
            ids = np.concatenate([ids, token[:, None]], axis=1)
            unfinished &= ~np.isin(token, eos)
            if not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
            positions = positions + 1
            (embeds,) = self.embed.run(None, {"input_ids": token[:, None]})
            feeds = self.step_inputs(embeds, mask, positions, cache)
        return ids


def _next_feeds(names: list[str], outputs: list) -> dict:
    """The outputs of a decoder call that the next call takes back: ``present.*`` as ``past_key_values.*`` and,
    with token pruning, ``pruned_mask`` as ``pruned_past_mask``."""
    feeds = {}
    for name, value in zip(names, outputs, strict=True):
        if name.startswith("present."):
            feeds[name.replace("present", "past_key_values")] = value
        elif name == "pruned_mask":
            feeds["pruned_past_mask"] = value
    return feeds


def sample(logits: np.ndarray, rng: np.random.Generator, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """One token per row of [B, V] logits, drawn from the softmax of ``warp(...)``."""
    probs = _softmax(warp(logits, temperature, top_k, top_p))
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


def warp(logits: np.ndarray, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """Scores as transformers' Temperature, TopK and TopP warpers leave them, in that order: divided by
    ``temperature``; all but the ``top_k`` largest set to -inf; then all outside the smallest set whose
    probability reaches ``top_p`` (at least one token)."""
    scores = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(scores, axis=-1)[:, -min(top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, like the warper
        probs = _softmax(np.take_along_axis(scores, order, axis=-1))
        drop_sorted = np.cumsum(probs, axis=-1) <= 1 - top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores = np.where(drop, -np.inf, scores)
    return scores


def _graph_kind(spec: dict) -> str | None:
    """The export's graph kind (``families.Family.onnx``): "tiled" (tiles and pixel masks in), "mrope" (patches
    and the ``qwen_vision_inputs`` in, 3-D positions), else the LLaVA graphs (one image tensor)."""
    family = FAMILIES.get(spec["model_type"])
    return family.onnx if family is not None else None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _generation_defaults(onnx_dir: Path) -> dict:
    """generation_config.json beside the graphs or in the checkpoint; EOS and pad ids fall back to config.json."""
    generation = {}
    for candidate in (onnx_dir / "generation_config.json", onnx_dir.parent / "generation_config.json"):
        if candidate.exists():
            generation = json.loads(candidate.read_text())
            break
    config_file = onnx_dir.parent / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        for key in ("eos_token_id", "pad_token_id"):
            value = config.get(key, (config.get("text_config") or {}).get(key))
            if generation.get(key) is None and value is not None:
                generation[key] = value
    return generation


def text_index(visual: np.ndarray) -> np.ndarray:
    """[B, T]: each row's non-visual positions in order, short rows repeating their last one."""
    rows = [np.flatnonzero(~row) for row in visual]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a row holds only image tokens; ShortV needs at least one text token per row")
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), mode="edge") for r in rows]).astype(np.int64)


# -- Qwen2-VL / Qwen2.5-VL's vision inputs and M-RoPE positions, as transformers computes them, in numpy -------


def kept_slots(visual: np.ndarray, ratio: float | None) -> np.ndarray:
    """The pruned decoder's ``kept_valid`` [B, A]: True on each row's first T + k slots (T its non-image tokens, k
    the image tokens FastV keeps, round((1 - ratio) x n) in float32, half to even, as the model file counts them;
    VTW, ``ratio`` None: 0), padded with False to the widest row."""
    n = visual.sum(1)
    kept = (~visual).sum(1)
    if ratio is not None:
        kept = kept + np.round(np.float32(1 - ratio) * n.astype(np.float32)).astype(np.int64)
    return np.arange(int(kept.max())) < kept[:, None]


def qwen_vision_inputs(grid, merge: int, window: int | None, patch: int) -> dict[str, np.ndarray]:
    """The vision graph's inputs for images of ``grid`` [[t, h, w], ...] (patches): each patch's (row, column) in
    merge-block order, the merge units in window order (``get_vision_window_index``), and which patches attend to
    which, in window order: within a window, and within a frame (the full-attention blocks). ``window`` None
    (Qwen2-VL): no windows, the identity order, and the window mask is the frame mask."""
    unit = merge * merge
    if window is None:  # a window as large as the largest frame: each frame is one window, in raster order
        window = max([max(h, w) for _, h, w in grid] + [1]) * patch
    size = window // merge // patch  # window side in merge units
    positions, index, cu, offset = [], [], [0], 0
    for t, h, w in grid:
        rows = np.repeat(np.arange(h)[:, None], w, 1)
        cols = np.repeat(np.arange(w)[None, :], h, 0)
        blocks = [
            a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)
        ]
        positions.append(np.tile(np.stack(blocks, -1), (t, 1)))
        lh, lw = h // merge, w // merge
        ph, pw = size - lh % size, size - lw % size
        padded = np.pad(np.arange(t * lh * lw).reshape(t, lh, lw), ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (lh + ph) // size, (lw + pw) // size
        padded = padded.reshape(t, nh, size, nw, size).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, size * size)
        cu.extend((np.cumsum((padded != -1).sum(-1).reshape(-1)) * unit + cu[-1]).tolist())
        flat = padded.reshape(-1)
        index.append(flat[flat != -1] + offset)
        offset += t * lh * lw
    window_index = np.concatenate(index).astype(np.int64)
    order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)  # patch order after the permutation
    frames = np.repeat([h * w for _, h, w in grid], [t for t, _, _ in grid])
    frame = np.repeat(np.arange(len(frames)), frames)[order]
    window_id = np.searchsorted(np.unique(cu)[1:], np.arange(len(order)), side="right")
    return {
        "position_ids": np.concatenate(positions).astype(np.int64),
        "window_index": window_index,
        "window_mask": window_id[:, None] == window_id[None, :],
        "full_mask": frame[:, None] == frame[None, :],
    }


def rope_index(types: np.ndarray, attention_mask: np.ndarray, grid, merge: int) -> np.ndarray:
    """Qwen2-VL / Qwen2.5-VL's 3-D positions [3, B, S] for images (``get_rope_index``): text counts on in all
    three rows; an image's tokens take (start, start + row, start + column) and the text after it continues at
    start + max(rows, columns). ``types``: the processor's mm_token_type_ids (0 text, 1 image); padding gets 0."""
    batch, seq = types.shape
    positions = np.zeros((3, batch, seq), np.int64)
    grids = iter(grid)
    for b in range(batch):
        valid = np.asarray(attention_mask[b]).astype(bool)
        kinds = np.asarray(types[b])[valid]
        pieces, current, i = [], 0, 0
        while i < len(kinds):
            j = i
            while j < len(kinds) and kinds[j] == kinds[i]:
                j += 1
            if kinds[i] == 0:
                pieces.append(np.arange(j - i)[None].repeat(3, 0) + current)
                current += j - i
            else:
                t, h, w = next(grids)
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
                pieces.append(np.stack([a.reshape(-1) for a in (tt, hh, ww)]) + current)
                current += max(h, w) // merge
            i = j
        if pieces:
            positions[:, b, valid] = np.concatenate(pieces, 1)
    return positions


# -- LLaVA-NeXT anyres, as transformers' modeling_llava_next does it, in numpy ----------------------------------


def select_best_resolution(original_size, possible_resolutions):
    original_height, original_width = original_size
    best_fit, best_effective, best_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best_fit, best_effective, best_wasted = (height, width), effective, wasted
    return best_fit


def image_size_to_num_patches(image_size, grid_pinpoints, tile: int) -> int:
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return -(-height // tile) * -(-width // tile) + 1


def unpad(features: np.ndarray, original_size) -> np.ndarray:
    """[D, H, W] features of the padded tiles -> the part that covers the original image."""
    original_height, original_width = original_size
    height, width = features.shape[1:]
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return features[:, padding : height - padding, :]
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return features[:, :, padding : width - padding]


def pack_anyres(features, image_size, grid_pinpoints, tile, side, newline) -> np.ndarray:
    """One image's tile features [tiles, side*side, D] -> its token features (base tile, then the unpadded
    grid with a newline embedding at the end of every row)."""
    if len(features) == 1:
        return np.concatenate([features[0], newline[None]])
    base, tiles = features[0], features[1:]
    best_height, best_width = select_best_resolution(image_size, grid_pinpoints)
    rows, cols = best_height // tile, best_width // tile
    grid = tiles.reshape(rows, cols, side, side, -1).transpose(4, 0, 2, 1, 3)
    grid = grid.reshape(grid.shape[0], rows * side, cols * side)
    grid = unpad(grid, image_size)
    ends = np.broadcast_to(newline[:, None, None], (*grid.shape[:-1], 1))
    grid = np.concatenate([grid, ends], axis=-1)
    return np.concatenate([base, grid.reshape(grid.shape[0], -1).T])
