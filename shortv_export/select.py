"""Stage 3, select: which decoder layers freeze visual tokens."""

from __future__ import annotations

from .errors import ShortVError

# Paper Table 8 / reference README (docs/method.md section 3), lowest LC first.
PAPER_LAYERS: dict[str, list[int]] = {
    "llava-hf/llava-1.5-7b-hf": [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19],
    "llava-hf/llava-1.5-13b-hf": [
        39,
        32,
        28,
        36,
        27,
        37,
        29,
        30,
        1,
        38,
        25,
        31,
        2,
        26,
        23,
        34,
        0,
        33,
        35,
        22,
        24,
        21,
        20,
        17,
    ],
    "llava-hf/llava-v1.6-vicuna-7b-hf": [31, 29, 30, 28, 26, 27, 22, 24, 21, 23, 25, 20, 19, 17, 18, 15, 12, 0, 2],
    "llava-hf/llava-v1.6-vicuna-13b-hf": [
        39,
        32,
        29,
        36,
        27,
        30,
        37,
        23,
        25,
        31,
        26,
        2,
        28,
        22,
        33,
        35,
        34,
        24,
        38,
        21,
        20,
        18,
        1,
        17,
    ],
}


def default_n(num_layers: int) -> int:
    """The default number of frozen layers: 60% of the decoder layers, rounded."""
    return int(num_layers * 0.6 + 0.5)


def paper_layers(model_id: str, name: str, num_layers: int) -> list[int]:
    """The published list for a known checkpoint, matched by Hub id or by folder name."""
    for repo_id, layers in PAPER_LAYERS.items():
        if model_id == repo_id or name == repo_id.split("/")[1]:
            if max(layers) >= num_layers:
                raise ShortVError(
                    f"--layers paper: {model_id} has {num_layers} layers, but the list published for "
                    f"{repo_id} needs {max(layers) + 1}"
                )
            return list(layers)
    raise ShortVError(
        f"--layers paper: no published layer list for {model_id}; known: {', '.join(PAPER_LAYERS)}. "
        "Calibrate with --n instead, or pass --layers 31,29,..."
    )


def parse_layers(spec: str, num_layers: int, model_id: str = "", name: str = "") -> list[int]:
    """``--layers``: 'paper' or comma-separated distinct layer ids in [0, num_layers), order kept."""
    spec = spec.strip()
    if spec.lower() == "paper":
        return paper_layers(model_id, name, num_layers)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ShortVError("--layers is empty: give layer ids like 31,29,30 or 'paper'")
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise ShortVError(f"--layers {spec!r}: layer ids must be integers, like 31,29,30") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ShortVError(f"--layers: {bad} out of range; the model has layers 0..{num_layers - 1}")
    dupes = sorted({i for i in layers if layers.count(i) > 1})
    if dupes:
        raise ShortVError(f"--layers: duplicate layer ids {dupes}")
    return layers


def check_n(n: int, num_layers: int) -> int:
    if not 1 <= n <= num_layers:
        raise ShortVError(f"--n {n} out of range: the model has {num_layers} layers, so N must be in 1..{num_layers}")
    return n


def lowest(order: list[int], n: int) -> list[int]:
    """The first ``n`` layers of an ascending-LC order."""
    return list(order[:n])


def smallest_n_for_flops(
    text_config, order: list[int], target: float, n_visual: float, n_text: float, prune: dict | None = None
) -> int:
    """``--target-flops R``: the smallest N whose prefill FLOPs ratio is <= R at these token counts (with the token
    pruning ``prune``, which the ratio counts too)."""
    from .flops import flops_summary

    if not 0 < target <= 1:
        raise ShortVError(f"--target-flops {target}: must be a ratio in (0, 1]")
    for n in range(len(order) + 1):
        if flops_summary(text_config, round(n_visual), round(n_text), order[:n], prune)["ratio"] <= target:
            return n
    best = flops_summary(text_config, round(n_visual), round(n_text), order, prune)["ratio"]
    raise ShortVError(
        f"--target-flops {target}: out of reach; freezing every layer gives {best:.3f} at "
        f"{n_visual:.0f} visual + {n_text:.0f} text tokens"
    )
