"""Generate text with a pre-trained LightGPT checkpoint, streaming each token to the terminal as it is sampled."""

import argparse
import sys

import torch

from conversations import encode_prompt, read_prompts, stop_tokens
from devices import compute_dtype
from finetuning import load_inference_model
from flags import ArgumentParser, add_inference_arguments, add_sampling_arguments
from generation import generate
from tokenizer import stream_text


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Complete prompts with a LightGPT checkpoint: --prompt once, else every line typed at "
                            "the terminal, else every line of standard input (one completion per line).")
    add_inference_arguments(parser, max_tokens=500)
    add_sampling_arguments(parser, "--repeat_penalty")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main() -> None:
    args = parse_args()
    try:
        model, block_size, template = load_inference_model(
            args.checkpoint_path, args.device, args.lora_path, compute_dtype(args.precision, torch.device(args.device)))
        if args.top_k > model.vocabulary_size:
            raise ValueError(f"--top_k must be at most the vocabulary size {model.vocabulary_size}, got {args.top_k}")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"generate.py: error: {error}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        for number, text in enumerate(read_prompts(args.prompt)):
            prompt = torch.tensor(encode_prompt(text, template), device=args.device)
            tokens = generate(model, prompt, args.max_tokens, args.temperature, args.top_k, args.top_p,
                              args.repeat_penalty, block_size, stop_tokens=stop_tokens(template, model.eos_index))
            # each prompt's text, then what the model writes: after a plain prompt the text goes on, after an
            # instruction the answer starts a line; a blank line between one prompt's text and the next
            print("\n" * (number > 0) + (text if template is None else f"> {text}\n"), end="", flush=True)
            for piece in stream_text(tokens):
                print(piece, end="", flush=True)
            print()
    except ValueError as error:  # a cache beyond the memory (generation.check_cache_memory)
        print()
        sys.exit(f"generate.py: error: {error}")
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
