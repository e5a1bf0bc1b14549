"""Preference-tune a chat-tuned LightGPT with Direct Preference Optimization on a fresh LoRA adapter."""

import argparse
import functools
import math
import random
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from checkpoint import (
    claimed_checkpoint,
    context_length,
    is_sharded_checkpoint,
    load_checkpoint,
    load_lora_checkpoint,
    save_atomically,
    weights_fingerprint,
)
from conversations import INSTRUCTION_EXTENSIONS, split_instructions
from devices import compiles, compute_dtype, gradient_scaler
from distributed import parallelize
from files import resolve_files, same_files
from finetuning import (
    adapter_checkpoint,
    adapter_on_base,
    adapter_optimizer,
    check_same_adapters,
    merged_adapter_entry,
    preference_loss,
    resume_adapters,
    saved_template,
)
from flags import ArgumentParser, add_training_arguments, fraction, positive_float, positive_int, run_config
from model import LightGPT, add_lora
from preferences import PREFERENCE_DATASETS, PreferenceSamples, load_preferences
from training import epoch_order, rng_state, train


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Preference-tune a chat-tuned LightGPT with DPO: train a fresh LoRA adapter to prefer "
                            "the chosen responses of pairs over the rejected ones, against the chat-tuned model "
                            "itself (the same network with the new adapter off).")
    parser.add_argument("--base_model_path", default=None,
                        help="The pre-trained checkpoint under the chat adapter (default: the one it names).")
    parser.add_argument("--lora_path", default="./out/lora_chat.pt",
                        help="The chat adapter of instruction-tune.py: merged into the base, it is the reference.")
    parser.add_argument("--dataset", default="ultrafeedback", choices=tuple(PREFERENCE_DATASETS),
                        help="ultrafeedback: HuggingFaceH4/ultrafeedback_binarized's train_prefs and test_prefs "
                        "from the hub; local: --dataset_path.")
    parser.add_argument("--dataset_path", default=None,
                        help="With --dataset local: a .json or .jsonl file, a folder or a glob of them, with records "
                        "{prompt, chosen, rejected} of strings or of messages [{role, content}, ...].")
    parser.add_argument("--beta", type=positive_float, default=0.1,
                        help="How far the tuned model may move from the chat-tuned one: lower lets it move further.")
    parser.add_argument("--label_smoothing", type=fraction, default=0.0,
                        help="The probability that a pair's preference is wrong (conservative DPO), below 0.5.")
    parser.add_argument("--rank", type=positive_int, default=8,
                        help="The rank of the LoRA decomposition matrices A and B.")
    parser.add_argument("--alpha", type=positive_float, default=1.0,
                        help="The strength of the LoRA signal: each weight becomes W + alpha * B @ A.")
    add_training_arguments(parser, learning_rate=5e-5, warmup_steps="10%", num_epochs=1, eval_interval=1,
                           checkpoint_interval=1, checkpoint_path="./out/lora_preference.pt", what="adapter")
    parser.set_defaults(gradient_accumulation_steps=32)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    if args.dataset == "local" and not args.dataset_path:
        raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a glob)")
    if args.dataset != "local" and args.dataset_path:
        raise ValueError(f"--dataset_path: only used with --dataset local, not with --dataset {args.dataset}")
    if args.label_smoothing >= 0.5:
        raise ValueError(f"--label_smoothing: must be below 0.5 (at 0.5 every preference is a coin toss), got "
                         f"{args.label_smoothing}")
    if not Path(args.lora_path).is_file():
        raise ValueError(f"--lora_path: no chat adapter at {args.lora_path}; run instruction-tune.py with a chat "
                         f"dataset first")
    if args.resume and not Path(args.checkpoint_path).is_file():
        raise ValueError(f"--resume: no adapter checkpoint at --checkpoint_path {args.checkpoint_path}")


def base_path_of(args: argparse.Namespace, chat: dict) -> str:
    """--base_model_path, else the base the chat adapter names; a one-line ValueError when there is none."""
    path = args.base_model_path or chat.get("base_model_path")
    if not path or not (Path(path).is_file() or is_sharded_checkpoint(path)):
        raise ValueError(f"--base_model_path: no checkpoint at {path}; give the pre-trained checkpoint that "
                         f"--lora_path {args.lora_path} was trained on")
    return path


def check_resumable(checkpoint: dict, base: dict, chat: dict, args: argparse.Namespace, base_path: str,
                    num_pairs: int) -> None:
    """Resuming must continue the same adapter on the same chat model and pairs: never change them silently."""
    check_same_adapters(checkpoint, base, base_path, args.rank, args.alpha)
    if checkpoint.get("merged_adapter", {}).get("fingerprint") != weights_fingerprint(chat["lora"]):
        raise ValueError(f"--resume: the adapter was trained on another chat adapter than --lora_path "
                         f"{args.lora_path}; use the original one")
    trained_with = checkpoint.get("args", {})
    if trained_with.get("dataset") != args.dataset or not same_files(
            trained_with.get("dataset_path"), args.dataset_path, INSTRUCTION_EXTENSIONS):
        raise ValueError(f"--resume: the checkpoint was trained on --dataset {trained_with.get('dataset')} "
                         f"{trained_with.get('dataset_path') or ''}, the flags ask for --dataset {args.dataset} "
                         f"{args.dataset_path or ''}; use the original dataset, or start anew without --resume")
    if checkpoint.get("num_train_samples", num_pairs) != num_pairs:
        raise ValueError(f"--resume: the checkpoint was trained on {checkpoint['num_train_samples']} pairs, this "
                         f"dataset has {num_pairs}; use the original dataset")


def preference_model(chat: dict, base: dict, args: argparse.Namespace, base_path: str) -> LightGPT:
    """The chat-tuned model (the chat adapter merged into the base, under finetuning's policy) with a fresh
    adapter and no dropout, so that the policy and the reference agree exactly before the first step."""
    without_dropout = base | {"model_args": base["model_args"] | {"dropout": 0.0}}
    model = adapter_on_base(chat, without_dropout, f"--lora_path {args.lora_path}", f"--base_model_path {base_path}")
    add_lora(model, args.rank, args.alpha, 0.0)
    return model


def main() -> None:
    args = parse_args()
    with ExitStack() as run:
        try:
            validate_args(args)
            chat = load_lora_checkpoint(args.lora_path)
            base_path = base_path_of(args, chat)
            files = resolve_files(args.dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path") if args.dataset_path \
                else []
            inputs = {"--base_model_path": [Path(base_path)], "--lora_path": [Path(args.lora_path)],
                      "--dataset_path": files}
            run.enter_context(claimed_checkpoint(args.checkpoint_path, inputs))
            base = load_checkpoint(base_path, required=("model_args", "model", "block_size"))
            block_size = context_length(base, base_path)
            template = saved_template(chat["prompt_template"], args.lora_path)
            train_pairs, test_pairs = load_preferences(args.dataset, args.dataset_path)
            if test_pairs is None:
                train_pairs, test_pairs = split_instructions(train_pairs)
            checkpoint = load_lora_checkpoint(args.checkpoint_path) if args.resume else None
            if checkpoint:
                check_resumable(checkpoint, base, chat, args, base_path, len(train_pairs))
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
        save_entries = {"merged_adapter": merged_adapter_entry(chat, args.lora_path)}
        preference_tune(args, model, base, base_path, seed, *samples, checkpoint, template, save_entries)


def weighted_by_pairs(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
    """Each micro-batch of pairs with its share of the step's pairs as its loss weight."""
    total = sum(len(inputs) for inputs, _ in batches)
    return [(inputs, targets, len(inputs) / total) for inputs, targets in batches]


def preference_tune(args, model: LightGPT, base: dict, base_path: str, seed: int, train_samples: PreferenceSamples,
                    test_samples: PreferenceSamples, checkpoint: dict | None, template, save_entries: dict) -> None:
    """Train the new adapter with DPO's loss; save it with the chat adapter it was trained on."""
    device = torch.device(args.device)
    model.to(device)
    dtype = compute_dtype(args.precision, device)
    training_model = parallelize(model, device, args.activation_checkpointing, compiles(args.compile, device))
    scaler = gradient_scaler(device, dtype)
    optimizer, adapters = adapter_optimizer(model, args.learning_rate, device)

    pairs_per_step = args.batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_samples) / pairs_per_step)
    step = 0
    if checkpoint:
        step = resume_adapters(model, optimizer, scaler, checkpoint, device, args.checkpoint_path)
        print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")

    eval_batches = weighted_by_pairs([test_samples.pairs(indices.tolist())
                                      for indices in torch.arange(len(test_samples)).split(args.batch_size)])
    trained = sum(parameter.numel() for parameter in adapters)
    print(f"LoRA: {trained:,} trainable adapter parameters on a frozen chat model of "
          f"{sum(parameter.numel() for parameter in model.parameters()) - trained:,}; {len(train_samples)} training "
          f"and {len(test_samples)} held-out pairs, {steps_per_epoch} steps per epoch")

    def micro_batches_at(step: int) -> list[tuple]:
        epoch, position = divmod(step, steps_per_epoch)
        indices = epoch_order(seed, epoch, len(train_samples))[position * pairs_per_step:][:pairs_per_step]
        return weighted_by_pairs([train_samples.pairs(chunk.tolist()) for chunk in indices.split(args.batch_size)])

    def save(step: int, epoch: int) -> None:
        save_atomically(adapter_checkpoint(
            model, base, base_path, {"rank": args.rank, "alpha": args.alpha, "dropout": 0.0}, template,
            optimizer.state_dict(), step, epoch, [rng_state(device)], vars(args) | {"seed": seed},
            grad_scaler=scaler.state_dict(), num_train_samples=len(train_samples), seed=seed, **save_entries,
        ), args.checkpoint_path)

    loss_of = functools.partial(preference_loss, beta=args.beta, label_smoothing=args.label_smoothing)
    run = run_config(args, steps_per_epoch=steps_per_epoch, unit="pairs", units_per_epoch=len(train_samples),
                     description="Preference-tuning", saved_what="adapter", program="preference-tune.py",
                     dtype=dtype, loss_of=loss_of)
    train(training_model, optimizer, micro_batches_at, eval_batches, save, run, step, scaler)


if __name__ == "__main__":
    main()
