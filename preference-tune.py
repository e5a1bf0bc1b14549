"""Preference-tune a chat-tuned LightGPT with Direct Preference Optimization on a fresh LoRA adapter."""

import argparse
import functools
import random
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from chats import CHAT_DATASETS
from checkpoint import (
    check_checkpoint_path,
    claimed_checkpoint,
    context_length,
    load_checkpoint,
    load_lora_checkpoint,
    weights_fingerprint,
)
from conversations import INSTRUCTION_EXTENSIONS, PromptTemplate, split_instructions
from files import resolve_files
from finetuning import (
    adapter_on_base,
    check_adapter_memory,
    check_base_path,
    check_same_adapters,
    dataset_flags,
    merged_adapter_entry,
    preference_loss,
    resumable_adapters,
    saved_template,
    train_adapters,
)
from flags import (
    ArgumentParser,
    add_lora_arguments,
    add_training_arguments,
    check_dataset_path,
    float_in,
    fraction,
    non_empty_path,
)
from lora import add_lora
from model import LightGPT
from preferences import PREFERENCE_DATASETS, PreferenceSamples, load_preferences
from run_log import check_log_dir
from training import weighted_by_rows


# DPO's gradients scale with beta: from 1e20 their norm, a float32 sum of squares, overflowed on a tiny model
# (0.2 * beta); below 1e-6 they sink under AdamW's epsilon (1e-8) on the same model.
BETAS = (1e-6, 1e6)
# The flags a resumed run must repeat besides the adapters' (finetuning.ADAPTER_FLAGS): they change the loss.
FIXED_FLAGS = ("beta", "label_smoothing")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Preference-tune a chat-tuned LightGPT with DPO: train a fresh LoRA adapter to prefer "
                            "the chosen responses of pairs over the rejected ones, against the chat-tuned model "
                            "itself (the same network with the new adapter off).")
    parser.add_argument("--base_model_path", type=non_empty_path, default=None,
                        help="The pre-trained checkpoint under the chat adapter (default: the one it names).")
    parser.add_argument("--lora_path", type=non_empty_path, default="./out/lora_chat.pt",
                        help="The chat adapter of instruction-tune.py: merged into the base, it is the reference.")
    parser.add_argument("--dataset", default="ultrafeedback", choices=tuple(PREFERENCE_DATASETS),
                        help="ultrafeedback: HuggingFaceH4/ultrafeedback_binarized's train_prefs and test_prefs "
                        "from the hub; local: --dataset_path.")
    parser.add_argument("--dataset_path", type=non_empty_path, default=None,
                        help="With --dataset local: a .json or .jsonl file, a folder or a glob of them, with records "
                        "{prompt, chosen, rejected} of strings or of messages [{role, content}, ...].")
    parser.add_argument("--beta", type=float_in(*BETAS), default=0.1,
                        help="How far the tuned model may move from the chat-tuned one: lower lets it move further; "
                        "from 1e-6 to 1e6, beyond which the gradients, proportional to it, overflow or vanish.")
    parser.add_argument("--label_smoothing", type=fraction, default=0.0,
                        help="The probability that a pair's preference is wrong (conservative DPO), below 0.5.")
    add_lora_arguments(parser)
    add_training_arguments(parser, learning_rate=5e-5, warmup_steps="10%", num_epochs=1, eval_interval=1,
                           checkpoint_interval=1, checkpoint_path="./out/lora_preference.pt", what="adapter")
    # Without dropout the policy is the reference until the first step, as TRL has it; a batch is of pairs.
    parser.set_defaults(dropout=0.0, gradient_accumulation_steps=32)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    check_dataset_path(args)
    if args.label_smoothing >= 0.5:
        raise ValueError(f"--label_smoothing: must be below 0.5 (at 0.5 every preference is a coin toss), got "
                         f"{args.label_smoothing}")
    if not Path(args.lora_path).is_file():
        raise ValueError(f"--lora_path: no chat adapter at {args.lora_path}; run instruction-tune.py with a chat "
                         f"dataset first")
    check_checkpoint_path(args.checkpoint_path, args.resume, "adapter checkpoint")
    check_log_dir(args)


def base_path_of(args: argparse.Namespace, chat: dict) -> str:
    """--base_model_path, else the base the chat adapter names; a one-line ValueError when there is none."""
    path = args.base_model_path or chat.get("base_model_path")
    remedy = f"give the pre-trained checkpoint that --lora_path {args.lora_path} was trained on as --base_model_path"
    if not path:
        raise ValueError(f"--base_model_path: --lora_path {args.lora_path} names no base; {remedy}")
    check_base_path(path, "--base_model_path" if args.base_model_path else
                    f"the base_model_path of --lora_path {args.lora_path}", remedy)
    return path


def chat_template(chat: dict, lora_path: str) -> PromptTemplate:
    """The chat adapter's template, or a one-line ValueError when it renders no chats (Alpaca's, of instructions)."""
    template = saved_template(chat["prompt_template"], lora_path)
    if not template.renders_chats():
        raise ValueError(f"--lora_path {lora_path}: an adapter in the {template.name} template, not a chat (ChatML) "
                         f"adapter; train one with instruction-tune.py on chats (--dataset "
                         f"{', '.join(CHAT_DATASETS)}, or local conversations)")
    return template


def check_resumable(checkpoint: dict, base: dict, chat: dict, args: argparse.Namespace, base_path: str) -> None:
    """Resuming must continue the same adapter on the same chat model and pairs: never change them silently."""
    check_same_adapters(checkpoint, base, base_path, args, FIXED_FLAGS, stacked=True)
    if checkpoint["merged_adapter"].get("fingerprint") != weights_fingerprint(chat["lora"]):
        raise ValueError(f"--resume: the adapter was trained on another chat adapter than --lora_path "
                         f"{args.lora_path}; use the original one")


def preference_model(chat: dict, base: dict, args: argparse.Namespace, base_path: str) -> LightGPT:
    """The chat-tuned model (the chat adapter merged into the base, under finetuning's policy) with a fresh
    adapter and --dropout in both, so that by default the policy and the reference agree exactly before the first
    step; the fresh adapter once it is known to fit in the device's memory."""
    with_dropout = base | {"model_args": base["model_args"] | {"dropout": args.dropout}}
    model = adapter_on_base(chat, with_dropout, f"--lora_path {args.lora_path}", f"--base_model_path {base_path}")
    check_adapter_memory(model, args.rank, args.device)
    add_lora(model, args.rank, args.alpha, args.dropout)
    return model


def main() -> None:
    args = parse_args()
    with ExitStack() as run:
        try:
            validate_args(args)
            chat = load_lora_checkpoint(args.lora_path)
            template = chat_template(chat, args.lora_path)
            base_path = base_path_of(args, chat)
            files = resolve_files(args.dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path") if args.dataset_path \
                else []
            inputs = {"--base_model_path": [Path(base_path)], "--lora_path": [Path(args.lora_path)],
                      "--dataset_path": files}
            run.enter_context(claimed_checkpoint(args.checkpoint_path, inputs, resume=args.resume))
            base = load_checkpoint(base_path, required=("model_args", "model", "block_size"))
            block_size = context_length(base, base_path)
            train_pairs, test_pairs = load_preferences(args.dataset, args.dataset_path)
            if test_pairs is None:
                train_pairs, test_pairs = split_instructions(train_pairs, dataset_flags(vars(args)))
            checkpoint = resumable_adapters(args.checkpoint_path) if args.resume else None
            if checkpoint:
                check_resumable(checkpoint, base, chat, args, base_path)
            seed = (checkpoint or {}).get("seed", args.seed)
            seed = seed if seed is not None else random.randrange(2**31)
            torch.manual_seed(seed)
            model = preference_model(chat, base, args, base_path)
            samples = [PreferenceSamples(pairs, template, block_size, model.padding_index)
                       for pairs in (train_pairs, test_pairs)]
        except (ValueError, FileNotFoundError, ConnectionError) as error:
            sys.exit(f"preference-tune.py: error: {error}")
        cut, dropped = sum(part.num_cut for part in samples), sum(part.num_dropped for part in samples)
        if cut or dropped:
            print(f"Pairs longer than the {block_size}-token context: {cut:,} with the start of their prompt cut, "
                  f"{dropped:,} dropped (a response alone does not fit)")
        for name, part in zip(("training", "held-out"), samples):
            if not len(part):
                sys.exit(f"preference-tune.py: error: no {name} pair fits in {block_size} tokens")
        args.base_model_path = base_path
        train_adapters(args, model, base, template, *samples, seed, checkpoint, what="pairs",
                       description="Preference-tuning", program="preference-tune.py",
                       loss_of=functools.partial(preference_loss, beta=args.beta, label_smoothing=args.label_smoothing),
                       weigh=weighted_by_rows, merged_adapter=merged_adapter_entry(chat, args.lora_path))


if __name__ == "__main__":
    main()
