"""Find the most likely continuations of a prompt with a LightGPT checkpoint, by beam search."""

import argparse
import sys

import torch

from conversations import encode_prompt, read_prompts, stop_tokens
from devices import available_memory, compute_dtype
from finetuning import load_inference_model
from flags import ArgumentParser, add_inference_arguments, float_in, positive_int
from generation import LENGTH_PENALTIES, beam_search
from model import LightGPT
from sizing import beam_search_bytes, gigabytes
from tokenizer import chat_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Print the num_candidates most likely continuations of each prompt, with their "
                            "scores: --prompt once, else every line typed at the terminal, else every line of "
                            "standard input.")
    add_inference_arguments(parser, max_tokens=200)
    parser.add_argument("--num_candidates", type=positive_int, default=3,
                        help="The number of candidate sequences to output.")
    parser.add_argument("--beam_width", type=positive_int, default=16,
                        help="The number of unfinished sequences to keep track of during the search.")
    parser.add_argument("--length_penalty", type=float_in(*LENGTH_PENALTIES), default=1.0,
                        help="Rank candidates by total log-probability / length ** length_penalty: 0 ranks by "
                        "probability alone, which favours short candidates; larger values favour long ones; from "
                        "-10 to 10.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for flags that cannot work together."""
    if args.beam_width < args.num_candidates:
        raise ValueError(
            f"--beam_width ({args.beam_width}) must be at least --num_candidates ({args.num_candidates})"
        )


def check_memory(args: argparse.Namespace, model: LightGPT, block_size: int, prompt_length: int) -> None:
    """Raise a one-line ValueError when the search would need more memory than the device has free."""
    config = model.config
    needed = beam_search_bytes(config.vocabulary_size, config.embedding_dimensions, config.num_layers, block_size,
                               args.beam_width, args.max_tokens, prompt_length)
    available = available_memory(torch.device(args.device))
    if needed > available:
        raise ValueError(f"--beam_width {args.beam_width} and --max_tokens {args.max_tokens} need about "
                         f"{gigabytes(needed)} for the search, more than the {gigabytes(available)} available on "
                         f"{args.device}; lower them")


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
        model, block_size, template = load_inference_model(
            args.checkpoint_path, args.device, args.lora_path, compute_dtype(args.precision, torch.device(args.device)))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"beam_search.py: error: {error}")
    if args.seed is not None:
        torch.manual_seed(args.seed)  # beam search draws nothing at random; the flag is kept for symmetry
    tokenizer = chat_tokenizer()  # a chat model may write its tokens too
    try:
        for number, text in enumerate(read_prompts(args.prompt)):
            print("\n" * (number > 0) + f"> {text}", flush=True)  # which prompt the candidates continue
            prompt = torch.tensor(encode_prompt(text, template), device=args.device)
            try:
                check_memory(args, model, block_size, len(prompt))
            except ValueError as error:
                sys.exit(f"beam_search.py: error: {error}")
            candidates = beam_search(model, prompt, args.max_tokens, args.beam_width, args.num_candidates,
                                     args.length_penalty, block_size, show_progress=True,
                                     stop_tokens=stop_tokens(template, model.eos_index))
            for rank, (tokens, score) in enumerate(candidates, 1):
                print(f"{rank}. [{score:.3f}] {tokenizer.decode(tokens)}", flush=True)
    except KeyboardInterrupt:
        print()
        sys.exit(130)


if __name__ == "__main__":
    main()
