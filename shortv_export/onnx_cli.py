"""`shortv-onnx FOLDER --image IMG --prompt TEXT`: answer one image and prompt with an exported checkpoint."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shortv-export", prog_name="shortv-onnx", message="%(prog)s %(version)s")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", required=True, help="The question; the processor's chat template wraps it.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--provider", default="cpu", show_default=True, help="cpu, cuda, tensorrt or an ORT provider name.")
def main(folder, image_path, prompt, max_new_tokens, provider):
    """Greedy answer from FOLDER's ONNX graphs (written by `shortv-export ... --onnx`)."""
    from PIL import Image, UnidentifiedImageError

    from .data import NESTED_IMAGES, format_prompt
    from .load import load_processor
    from .onnx_runtime import ShortVOnnxModel

    try:
        model = ShortVOnnxModel.from_pretrained(folder, provider=provider)
        image = Image.open(image_path).convert("RGB")
    except (FileNotFoundError, ValueError, UnidentifiedImageError, OSError) as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    processor = load_processor(folder)
    images = [[image]] if type(processor).__name__ in NESTED_IMAGES else [image]
    inputs = processor(images=images, text=[format_prompt(processor, prompt)], return_tensors="np")
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    answer = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    click.echo(answer.strip())


if __name__ == "__main__":
    main()
