"""The figures a conversion reports, one small type each, with the one log line and the card text made from it.

Each wraps the report its stage returns (the form lc.json and shortv_onnx.json store): the fields are typed
attributes, and the report stays readable as a read-only mapping (``result.flops["ratio"]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .flops import format_flops


@dataclass(frozen=True, eq=False)
class _Figures(Mapping):
    report: dict

    @classmethod
    def of(cls, report: Mapping[str, Any] | None):
        """The figures of ``report`` (None stays None); keys the type has no field for stay in the mapping."""
        if report is None or isinstance(report, cls):
            return report
        report, keys = dict(report), getattr(cls, "KEYS", {})
        names = [f.name for f in fields(cls) if f.name != "report"]
        return cls(report, **{name: report[keys.get(name, name)] for name in names if keys.get(name, name) in report})

    def __getitem__(self, key: str):
        return self.report[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.report)

    def __len__(self) -> int:
        return len(self.report)

    def __eq__(self, other) -> bool:
        return dict(self.report) == (dict(other) if isinstance(other, Mapping) else other)


@dataclass(frozen=True, eq=False)
class Flops(_Figures):
    """Prefill FLOPs of the decoder layers, vanilla and ShortV (flops.flops_summary), at the token counts
    ``tokens_from`` names."""

    n_visual: int = 0
    n_text: int = 0
    vanilla_tflops: float = 0.0
    shortv_tflops: float = 0.0
    ratio: float = 1.0
    ideal_speedup: float = 1.0
    tokens_from: str = "per prompt"
    SOURCES: ClassVar[dict[str, str]] = {
        "calibration set mean": "the calibration set's mean per prompt",
        "typical prompt": "one typical image and a 64-token prompt",
    }

    def log_line(self) -> str:
        return (
            f"prefill FLOPs at {self.n_visual} visual + {self.n_text} text tokens ({self.tokens_from}): "
            f"{format_flops(self.vanilla_tflops)} -> {format_flops(self.shortv_tflops)} "
            f"(ratio {self.ratio:.3f}, ideal speed-up {self.ideal_speedup:.2f}x)"
        )

    def card_lines(self) -> list[str]:
        source = self.SOURCES.get(self.tokens_from, "per prompt")
        return [
            "## Prefill FLOPs (decoder layers)",
            "",
            f"For {self.n_visual} visual + {self.n_text} text tokens ({source}): "
            f"{format_flops(self.vanilla_tflops)} vanilla, {format_flops(self.shortv_tflops)} ShortV, ratio "
            f"{self.ratio:.3f} (ideal prefill speed-up {self.ideal_speedup:.2f}x).",
            "",
        ]


@dataclass(frozen=True, eq=False)
class Fidelity(_Figures):
    """The selected layers frozen together on the calibration set: KL to the base model and top-1 agreement, and,
    below the ``min_agreement`` floor, the largest N that stays above it."""

    layers: list = None
    mean_kl: float = 0.0
    top1_agreement: float = 1.0
    samples: int = 0
    min_agreement: float | None = None
    largest_n_above_min_agreement: int = 0
    largest_n_top1_agreement: float | None = None

    @property
    def below_floor(self) -> bool:
        return self.min_agreement is not None and self.top1_agreement < self.min_agreement

    def log_line(self) -> str:
        return (
            f"all {len(self.layers)} frozen together: mean KL {self.mean_kl:.4g}, top-1 agreement "
            f"{self.top1_agreement:.1%} on {self.samples} samples"
        )

    def warning(self) -> str | None:
        """The warning for a selection below its floor, if it is."""
        if not self.below_floor:
            return None
        good = self.largest_n_above_min_agreement
        advice = f"--n {good} keeps {self.largest_n_top1_agreement:.1%}" if good else "no N >= 1 stays above it"
        return (
            f"top-1 next-token agreement with the base model is {self.top1_agreement:.1%} with {len(self.layers)} "
            f"layers frozen, below --min-agreement {self.min_agreement:.0%}; {advice} (a rerun with --overwrite into "
            "the same --out reuses the LC)"
        )

    def card_sentence(self) -> str:
        below = ""
        if self.below_floor:
            good = self.largest_n_above_min_agreement
            keeps = f"; freezing the {good} lowest-LC layers keeps {self.largest_n_top1_agreement:.1%}" if good else ""
            below = f" That is below the {self.min_agreement:.0%} this conversion was asked to keep{keeps}."
        return (
            f"On the {self.samples} calibration samples, with all {len(self.layers)} layers frozen together: "
            f"mean KL to the base model {self.mean_kl:.4g}, top-1 next-token agreement "
            f"{self.top1_agreement:.1%}.{below}"
        )


@dataclass(frozen=True, eq=False)
class Verification(_Figures):
    """The written folder reloaded in a fresh process (verify.verify_folder)."""

    samples: int = 0
    model_class: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    max_abs_logits_diff_vs_in_process: float = 0.0
    tolerance: float = 0.0
    mean_kl_vs_base: float = 0.0
    top1_agreement_vs_base: float = 1.0
    generate_rows: int = 0
    generate_new_tokens: int = 0
    generate_max_abs_logits_diff_cached_vs_uncached: float = 0.0
    transformers: str = ""
    KEYS: ClassVar[dict[str, str]] = {"model_class": "class"}  # field -> report key, where they differ

    def log_line(self) -> str:
        return (
            f"verified: reloaded {self.model_class} matches the in-process model (max |logits diff| "
            f"{self.max_abs_logits_diff_vs_in_process:.2e}); vs base: mean KL {self.mean_kl_vs_base:.4g}, top-1 "
            f"agreement {self.top1_agreement_vs_base:.0%} on {self.samples} prompts; generating with the cache "
            f"matches without it (max |logits diff| {self.generate_max_abs_logits_diff_cached_vs_uncached:.2e}, "
            f"{self.dtype})"
        )

    def card_lines(self) -> list[str]:
        diff = self.max_abs_logits_diff_vs_in_process
        match = "exactly" if diff == 0 else f"within {diff:.2g} (tolerance {self.tolerance:.2g})"
        return [
            "## Verification",
            "",
            f"After it was written, this folder was reloaded in a fresh process with `transformers` alone "
            f"(`{self.model_class}`, trust_remote_code) and run on {self.samples} calibration prompts: its logits "
            f"match the in-process ShortV model {match}, no weight is missing or unexpected, and against the base "
            f"model the mean KL of the next-token distribution is {self.mean_kl_vs_base:.4g} with "
            f"{self.top1_agreement_vs_base:.0%} top-1 agreement. Greedy generation for a padded batch of "
            f"{self.generate_rows} prompts ({self.generate_new_tokens} new tokens) with the KV cache gives the logits "
            "that one forward over the same tokens without the cache gives (max difference "
            f"{self.generate_max_abs_logits_diff_cached_vs_uncached:.2g}), and the in-process model's tokens. "
            f"Run in {self.dtype} on {self.device}. Checked with transformers {self.transformers}.",
            "",
        ]


@dataclass(frozen=True, eq=False)
class OnnxValidation(_Figures):
    """The exported graphs run by ONNX Runtime against PyTorch (onnx_validate.validate_export)."""

    samples: int = 0
    decode_steps: int = 0
    max_abs_logits_diff: float = 0.0
    max_abs_decode_logits_diff: float = 0.0
    tolerance: float = 0.0
    max_abs_present_diff: float = 0.0
    greedy_tokens_agree: bool = True

    @property
    def max_logits_diff(self) -> float:
        return max(self.max_abs_logits_diff, self.max_abs_decode_logits_diff)

    def log_line(self) -> str:
        return (
            f"ONNX Runtime vs PyTorch on {self.samples} sample prompts, prefill and {self.decode_steps} decode "
            f"steps: max |logits diff| {self.max_logits_diff:.2e} (tolerance {self.tolerance:.2e}), max |KV cache "
            f"diff| {self.max_abs_present_diff:.2e}, greedy tokens {'agree' if self.greedy_tokens_agree else 'differ'}"
        )

    def card_lines(self) -> list[str]:
        return [
            f"Checked at export against PyTorch on {self.samples} padded sample prompts, prefill and "
            f"{self.decode_steps} decode steps: max |logits diff| {self.max_logits_diff:.2g} (tolerance "
            f"{self.tolerance:.2g}), max |KV cache diff| {self.max_abs_present_diff:.2g}, greedy tokens "
            f"{'the same' if self.greedy_tokens_agree else 'not all the same'}.",
            "",
        ]


@dataclass(frozen=True, eq=False)
class Quantization(_Figures):
    """What --onnx-quantize did to the decoder, and its agreement with the unquantized graph."""

    scheme: str = ""
    method: str = ""
    block_size: int = 0
    quantized_matmuls: int = 0
    decoder_bytes_before: int = 0
    decoder_bytes_after: int = 0
    top1_agreement_vs_unquantized: float = 1.0
    mean_kl: float = 0.0
    samples: int = 0

    def _sizes(self) -> str:
        return f"{self.decoder_bytes_before / 2**20:.1f} -> {self.decoder_bytes_after / 2**20:.1f} MiB"

    def log_line(self) -> str:
        return (
            f"decoder quantized to {self.scheme} ({self.quantized_matmuls} MatMuls, {self._sizes()}): top-1 "
            f"agreement with the unquantized graph {self.top1_agreement_vs_unquantized:.1%} on {self.samples} "
            f"calibration prompts, mean KL {self.mean_kl:.3g}"
        )

    def warning(self, floor: float) -> str | None:
        share = self.top1_agreement_vs_unquantized
        if share >= floor:
            return None
        return (
            f"the {self.scheme} decoder agrees with the unquantized one on {share:.1%} of next tokens, below "
            f"--min-agreement {floor:.0%}"
        )

    def card_lines(self) -> list[str]:
        return [
            f"The decoder's weights are quantized to {self.scheme} ({self.method}, blocks of {self.block_size}; "
            f"{self._sizes()}). Against the unquantized graph on {self.samples} calibration prompts: top-1 "
            f"next-token agreement {self.top1_agreement_vs_unquantized:.1%}, mean KL {self.mean_kl:.3g}.",
            "",
        ]
