"""Train a small, architecture-faithful LLaVA from scratch on easy-VQA (CPU, fixed seed), saved like llava-hf.

    pip install easy-vqa
    python scripts/train_tiny_llava.py examples/tiny-llava-easyvqa        # about 25 minutes on 2 CPU cores

CLIP vision tower (64x64 images, 16x16 patches: 16 visual tokens), a 2-layer GELU projector and a 12-layer Llama
decoder, with a word-level tokenizer, the chat template ``USER: <image>\\n{question} ASSISTANT: {answer}</s>`` and
a LlavaProcessor, all saved with save_pretrained so the folder loads like any llava-hf checkpoint. The loss is
on the answer word and ``</s>``. Data: easy-VQA (Victor Zhou, MIT license), 38,575 train questions on 4,000
images; 13 answers. ``metrics.json`` beside the weights records the training run and the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortv_export.tiny import _SPECIALS, _WORDS, CHAT_TEMPLATE  # noqa: E402

IMAGE_SIZE = 64


def easy_vqa_split(split: str):
    """(questions, answers, image paths) of easy-VQA's train or test split."""
    import easy_vqa

    if split == "train":
        questions, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return questions, answers, [paths[i] for i in ids]


def make_processor(patch: int):
    import easy_vqa
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set(_WORDS) | set(easy_vqa.get_answers())
    for split in ("train", "test"):
        for q in easy_vqa_split(split)[0]:
            words |= set(re.findall(r"\w+|[^\w\s]+", q))
    words |= {"USER", "ASSISTANT", ":"}
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + sorted({w.lower() for w in words} - set(_SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )
    return llava_processor(tokenizer, patch, CHAT_TEMPLATE)


def llava_processor(tokenizer, patch: int, chat_template: str):
    """A LlavaProcessor for easy-VQA's 64x64 images (CLIP's normalisation; one visual token a patch)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def make_model(processor, layers: int, hidden: int, patch: int, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch,
        projection_dim=128,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // patch) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def prompt_text(processor, question: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Encoded:
    """Every question of a split as token ids, every image as pixels, computed once."""

    def __init__(self, processor, questions, answers, paths):
        from PIL import Image

        unique = sorted(set(paths))
        index = {p: i for i, p in enumerate(unique)}
        images = [Image.open(p).convert("RGB") for p in unique]
        self.pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        self.image = torch.tensor([index[p] for p in paths])
        dummy = images[0]
        prompts = {}
        for q in set(questions):
            prompts[q] = processor(images=[dummy], text=[prompt_text(processor, q)])["input_ids"][0]
        tok = processor.tokenizer
        self.prompt = [prompts[q] for q in questions]
        self.answer = [tok.convert_tokens_to_ids(a) for a in answers]
        self.answers = list(answers)
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id

    def __len__(self):
        return len(self.prompt)

    def train_batch(self, rows):
        """Right-padded prompt + answer + </s>; labels on the answer and </s> only."""
        seqs = [self.prompt[r] + [self.answer[r], self.eos] for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), self.pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            n = len(self.prompt[r])
            labels[i, n : n + 2] = torch.tensor([self.answer[r], self.eos])
        return ids, mask, labels, self.pixels[self.image[rows]]

    def prompt_batch(self, rows):
        """Left-padded prompts, as generate() takes them."""
        width = max(len(self.prompt[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = self.prompt[r]
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids, mask, self.pixels[self.image[rows]]


@torch.no_grad()
def accuracy(model, data: Encoded, rows, processor, batch_size: int = 256, max_new_tokens: int = 3) -> float:
    """Exact match of the greedy answer (generate, special tokens skipped)."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask, pixels = data.prompt_batch(chunk)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)
        texts = processor.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        correct += sum(t.strip() == data.answers[r] for t, r in zip(texts, chunk, strict=True))
    return correct / len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--patch", type=int, default=16, help="vision patch size (64x64 images)")
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="stop early past this (the run is then machine-dependent)")
    parser.add_argument("--eval-every", type=int, default=400)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    start = time.time()

    processor = make_processor(args.patch)
    train = Encoded(processor, *easy_vqa_split("train"))
    test = Encoded(processor, *easy_vqa_split("test"))
    model = make_model(processor, args.layers, args.hidden, args.patch, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; {len(train)} train, {len(test)} test questions", flush=True)

    steps = math.ceil(args.epochs * len(train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(200, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=generator)
    probe = torch.randperm(len(test), generator=generator)[:500].tolist()
    history = []
    position = 0
    step = 0
    for step in range(1, steps + 1):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(train), generator=generator), 0
        rows = order[position : position + args.batch_size]
        position += args.batch_size
        model.train()
        ids, mask, labels, pixels = train.train_batch(rows)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        minutes = (time.time() - start) / 60
        if step % args.eval_every == 0 or step == steps:
            acc = accuracy(model, test, probe, processor)
            history.append({"step": step, "loss": loss.item(), "probe_acc": acc, "minutes": round(minutes, 2)})
            print(f"step {step}/{steps}  loss {float(loss):.4f}  probe acc {acc:.3f}  {minutes:.1f} min", flush=True)
        if args.max_minutes is not None and minutes > args.max_minutes:
            print(f"stopping at step {step}: {args.max_minutes} minutes", flush=True)
            break
    train_minutes = (time.time() - start) / 60
    model.eval()
    test_acc = accuracy(model, test, list(range(len(test))), processor)
    print(f"test accuracy (all {len(test)} questions, greedy exact match): {test_acc:.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    metrics = {
        "command": "python scripts/train_tiny_llava.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "parameters": n_params,
        "steps": step,
        "batch_size": args.batch_size,
        "train_minutes": round(train_minutes, 1),
        "test_accuracy": test_acc,
        "test_questions": len(test),
        "history": history,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "data": "easy-VQA 1.0 (pip install easy-vqa), Victor Zhou, MIT license",
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
