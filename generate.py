"""Generate text with a pre-trained LightGPT checkpoint, streaming each token to the terminal as it is sampled."""

import argparse
import codecs
import sys
from collections.abc import Iterator

import torch

from conversations import encode_prompt, read_prompts, stop_tokens
from devices import compute_dtype
from finetuning import load_inference_model
from flags import ArgumentParser, add_inference_arguments, float_in, positive_float, positive_int, probability
from generation import REPEAT_PENALTIES, generate
from tokenizer import load_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Complete prompts with a LightGPT checkpoint: --prompt once, else every line typed at "
                            "the terminal, else every line of standard input (one completion per line).")
    add_inference_arguments(parser, max_tokens=500)
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="Divide the logits by this: below 1 sharpens the distribution, above 1 flattens it; "
                        "below 1e-4, always the most likely token (greedy).")
    parser.add_argument("--top_k", type=positive_int, default=500,
                        help="Only sample from this many candidate tokens with the highest probabilities.")
    parser.add_argument("--top_p", type=probability, default=0.9,
                        help="Of the top_k tokens, keep only the most likely ones whose probabilities add up to "
                        "top_p (the most likely one always stays).")
    parser.add_argument("--repeat_penalty", type=float_in(*REPEAT_PENALTIES), default=1.0,
                        help="Make the tokens already in the context less likely: their positive logits are "
                        "divided by this, negative ones multiplied (1 turns it off); from 1e-6 to 1e6.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def stream_text(tokens: Iterator[int]) -> Iterator[str]:
    """The text of the tokens as they come, holding back the bytes of a character split across tokens."""
    tokenizer = load_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        yield decoder.decode(tokenizer.decode_single_token_bytes(token))
    yield decoder.decode(b"", final=True)


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
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
