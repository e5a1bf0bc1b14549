"""Instruction-tune a pre-trained LightGPT with LoRA adapters on instruction/response pairs."""

import argparse
import random
import sys
from argparse import BooleanOptionalAction
from contextlib import ExitStack
from pathlib import Path

import torch

from checkpoint import check_checkpoint_path, claimed_checkpoint, load_checkpoint
from chats import ChatSamples, load_examples
from conversations import (
    ALPACA,
    CHATML,
    INSTRUCTION_DATASETS,
    INSTRUCTION_EXTENSIONS,
    InstructionSamples,
    PromptTemplate,
    split_instructions,
)
from files import resolve_files
from finetuning import (
    add_chat_tokens,
    check_base_path,
    check_same_adapters,
    dataset_flags,
    lora_args,
    lora_model,
    resumable_adapters,
    train_adapters,
)
from flags import (
    ArgumentParser,
    add_lora_arguments,
    add_training_arguments,
    check_dataset_path,
    non_empty_path,
    positive_int,
)
from integrity import context_length
from run_log import check_log_dir
from tokenizer import CHAT_VOCABULARY_SIZE


# The flags a resumed run must repeat besides the adapters' (finetuning.ADAPTER_FLAGS): they change the samples.
FIXED_FLAGS = ("max_tokens_per_sample", "mask_input")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Instruction-tune a pre-trained LightGPT: train small LoRA adapters on "
                            "instruction/response pairs while the base model stays frozen, and save only the adapters.")
    parser.add_argument("--base_model_path", type=non_empty_path, default="./out/checkpoint.pt",
                        help="The pre-trained checkpoint written by pre-train.py.")
    parser.add_argument("--dataset", default="alpaca", choices=tuple(INSTRUCTION_DATASETS),
                        help="alpaca: tatsu-lab/alpaca from the hub; chitchat: 4,017 conversations, offline; "
                        "smol-smoltalk, smoltalk, ultrafeedback: chats from the hub; local: --dataset_path. Chats "
                        "are learned in ChatML.")
    parser.add_argument("--dataset_path", type=non_empty_path, default=None,
                        help="With --dataset local: a .json or .jsonl file, a folder or a glob of them, with "
                        "records {instruction, input (optional), output} or {messages: [{role, content}, ...]}.")
    parser.add_argument("--dataset_subset", default=None,
                        help="With --dataset smoltalk: its subset (all, everyday-conversations, smol-rewrite, "
                        "systemchats-30k, ...); all when not given.")
    parser.add_argument("--max_tokens_per_sample", type=positive_int, default=None,
                        help="Cut a sample longer than this (or than the context): a conversation after its last "
                        "assistant turn that fits (dropped when none does), an instruction's prompt from its start; "
                        "the context when not given.")
    parser.add_argument("--mask_input", action=BooleanOptionalAction, default=False,
                        help="Leave the prompt out of the loss, so only the response is learned.")
    add_lora_arguments(parser)
    add_training_arguments(parser, learning_rate=5e-4, warmup_steps=0, num_epochs=4, eval_interval=1,
                           checkpoint_interval=1, checkpoint_path="./out/lora_instruction.pt", what="adapter")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    check_dataset_path(args)
    if args.dataset_subset and args.dataset != "smoltalk":
        raise ValueError(f"--dataset_subset: only used with --dataset smoltalk, not with --dataset {args.dataset}")
    check_base_path(args.base_model_path, "--base_model_path", "run pre-train.py first")
    check_checkpoint_path(args.checkpoint_path, args.resume, "adapter checkpoint")
    check_log_dir(args)


def instruction_files(args: argparse.Namespace) -> list[Path]:
    return resolve_files(args.dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path") if args.dataset == "local" else []


def main() -> None:
    args = parse_args()
    with ExitStack() as run:
        try:
            validate_args(args)
            inputs = {"--base_model_path": [Path(args.base_model_path)], "--dataset_path": instruction_files(args)}
            run.enter_context(claimed_checkpoint(args.checkpoint_path, inputs, resume=args.resume))
            base = load_checkpoint(args.base_model_path, required=("model_args", "model", "block_size"))
            block_size = context_length(base, args.base_model_path)
            kind, train_records, test_records = load_examples(args.dataset, args.dataset_path, args.dataset_subset)
            if test_records is None:
                train_records, test_records = split_instructions(train_records, dataset_flags(vars(args)))
            checkpoint = resumable_adapters(args.checkpoint_path) if args.resume else None
            if checkpoint:
                check_same_adapters(checkpoint, base, args.base_model_path, args, FIXED_FLAGS)
            seed = (checkpoint or {}).get("seed", args.seed)
            seed = seed if seed is not None else random.randrange(2**31)
            torch.manual_seed(seed)
            model = lora_model(base, args.base_model_path, lora_args(args), args.device)
        except (ValueError, FileNotFoundError, ConnectionError) as error:
            sys.exit(f"instruction-tune.py: error: {error}")

        if kind == "chat":
            add_chat_tokens(model, CHAT_VOCABULARY_SIZE)
            template, what = CHATML, "conversations"
            train_samples, test_samples = chat_samples(args, CHATML, block_size, model.padding_index,
                                                       train_records, test_records)
        else:
            template, what = ALPACA, "instructions"
            train_samples, test_samples = alpaca_samples(args, block_size, model.padding_index,
                                                         train_records, test_records)
        train_adapters(args, model, base, template, train_samples, test_samples, seed, checkpoint, what=what,
                       description="Instruction-tuning", program="instruction-tune.py")


def alpaca_samples(args, block_size: int, padding_index: int, *records: list) -> list[InstructionSamples]:
    """The instructions in Alpaca's template, each cut to --max_tokens_per_sample and the context from its start."""
    limit = sample_limit(args, block_size)
    samples = [InstructionSamples(part, ALPACA, limit, args.mask_input, padding_index) for part in records]
    num_truncated = sum(part.num_truncated for part in samples)
    if num_truncated:
        print(f"{num_truncated} samples are longer than {limit} tokens: their start is cut off, the prompt's first")
    return samples


def sample_limit(args, block_size: int) -> int:
    return min(args.max_tokens_per_sample or block_size, block_size)


def chat_samples(args, template: PromptTemplate, block_size: int, padding_index: int, *records: list
                 ) -> list[ChatSamples]:
    """The conversations in the template, each cut to --max_tokens_per_sample and the context, or dropped."""
    limit = sample_limit(args, block_size)
    samples = [ChatSamples(part, template, limit, padding_index) for part in records]
    cut, dropped = sum(part.num_cut for part in samples), sum(part.num_dropped for part in samples)
    if cut or dropped:
        print(f"Conversations longer than {limit} tokens: {cut:,} cut after their last assistant turn that fits, "
              f"{dropped:,} dropped (not even their first reply fits)")
    for name, part in zip(("training", "held-out"), samples):
        if not len(part):
            sys.exit(f"instruction-tune.py: error: no {name} conversation fits in {limit} tokens; raise "
                     f"--max_tokens_per_sample or use a base model with a longer context")
    return samples


if __name__ == "__main__":
    main()
