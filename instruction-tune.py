"""Instruction-tune a pre-trained LightGPT with LoRA adapters on instruction/response pairs."""

import argparse
import math
import random
import sys
from argparse import BooleanOptionalAction
from contextlib import ExitStack
from pathlib import Path

import torch

from checkpoint import (
    check_same_base,
    claimed_checkpoint,
    context_length,
    is_sharded_checkpoint,
    load_checkpoint,
    load_lora_checkpoint,
    model_from_checkpoint,
    save_atomically,
    trained_on_these_weights,
    training_checkpoint,
    weights_fingerprint,
)
from conversations import (
    ALPACA,
    INSTRUCTION_DATASETS,
    INSTRUCTION_EXTENSIONS,
    InstructionSamples,
    load_instructions,
    split_instructions,
)
from data import resolve_files, same_files
from devices import compiles, compute_dtype, gradient_scaler
from distributed import parallelize
from flags import ArgumentParser, add_training_arguments, fraction, positive_float, positive_int
from model import LightGPT, add_lora, load_lora_state_dict, lora_state_dict
from training import (
    note_optimizer_starts_afresh,
    restore_rng_state,
    restore_scaler,
    rng_state,
    train,
    weighted_by_targets,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Instruction-tune a pre-trained LightGPT: train small LoRA adapters on "
                            "instruction/response pairs while the base model stays frozen, and save only the adapters.")
    parser.add_argument("--base_model_path", default="./out/checkpoint.pt",
                        help="The pre-trained checkpoint written by pre-train.py.")
    parser.add_argument("--dataset", default="alpaca", choices=INSTRUCTION_DATASETS,
                        help="alpaca: tatsu-lab/alpaca from the HuggingFace hub (needs internet); local: your own "
                        "Alpaca-format .json or .jsonl files at --dataset_path.")
    parser.add_argument("--dataset_path", default=None,
                        help="With --dataset local: a .json or .jsonl file, a folder or a glob of them, with "
                        "records {instruction, input (optional), output}.")
    parser.add_argument("--mask_input", action=BooleanOptionalAction, default=False,
                        help="Leave the prompt out of the loss, so only the response is learned.")
    parser.add_argument("--rank", type=positive_int, default=8,
                        help="The rank of the LoRA decomposition matrices A and B.")
    parser.add_argument("--alpha", type=positive_float, default=1.0,
                        help="The strength of the LoRA signal: each weight becomes W + alpha * B @ A.")
    parser.add_argument("--dropout", type=fraction, default=0.05,
                        help="The proportion of signals to send to zero during training as regularization "
                        "(in the adapters' inputs and in the frozen model).")
    add_training_arguments(parser, learning_rate=5e-4, warmup_steps=0, num_epochs=4, eval_interval=1,
                           checkpoint_interval=1, checkpoint_path="./out/lora_instruction.pt", what="adapter")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    if args.dataset == "local" and not args.dataset_path:
        raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a glob)")
    if args.dataset == "alpaca" and args.dataset_path:
        raise ValueError("--dataset_path: only used with --dataset local; --dataset alpaca comes from the hub")
    if not (Path(args.base_model_path).is_file() or is_sharded_checkpoint(args.base_model_path)):
        raise ValueError(f"--base_model_path: no checkpoint at {args.base_model_path}; run pre-train.py first")
    if args.resume and not Path(args.checkpoint_path).is_file():
        raise ValueError(f"--resume: no adapter checkpoint at --checkpoint_path {args.checkpoint_path}")


def instruction_files(args: argparse.Namespace) -> list[Path]:
    return resolve_files(args.dataset_path, INSTRUCTION_EXTENSIONS, "--dataset_path") if args.dataset == "local" else []


def check_resumable(checkpoint: dict, base: dict, args: argparse.Namespace, num_train_samples: int) -> None:
    """Resuming must continue the same adapters on the same base and data: never change them silently."""
    check_same_base(checkpoint, base)
    if not trained_on_these_weights(checkpoint, base):
        raise ValueError(f"--resume: the adapters were trained on a base with other weights than "
                         f"--base_model_path {args.base_model_path}; use the original base checkpoint")
    for name in ("rank", "alpha"):
        if checkpoint["lora_args"][name] != getattr(args, name):
            raise ValueError(f"--resume: the checkpoint has --{name} {checkpoint['lora_args'][name]}, "
                             f"the flags ask for {getattr(args, name)}; repeat the original run's flags")
    trained_with = checkpoint.get("args", {})
    if "dataset" in trained_with and (trained_with["dataset"] != args.dataset or not same_files(
            trained_with.get("dataset_path"), args.dataset_path, INSTRUCTION_EXTENSIONS)):
        raise ValueError(f"--resume: the checkpoint was trained on {dataset_flags(trained_with)}, the flags ask for "
                         f"{dataset_flags(vars(args))}; use the original dataset, or start anew without --resume")
    if checkpoint.get("num_train_samples", num_train_samples) != num_train_samples:
        raise ValueError(f"--resume: the checkpoint was trained on {checkpoint['num_train_samples']} instructions, "
                         f"this dataset has {num_train_samples}; use the original dataset")


def dataset_flags(flags: dict) -> str:
    return f"--dataset {flags['dataset']}" + (f" --dataset_path {flags.get('dataset_path')}"
                                              if flags["dataset"] == "local" else "")


def main() -> None:
    args = parse_args()
    with ExitStack() as run:
        try:
            validate_args(args)
            inputs = {"--base_model_path": [Path(args.base_model_path)], "--dataset_path": instruction_files(args)}
            run.enter_context(claimed_checkpoint(args.checkpoint_path, inputs))
            base = load_checkpoint(args.base_model_path, required=("model_args", "model", "block_size"))
            block_size = context_length(base, args.base_model_path)
            train_records, test_records = split_instructions(load_instructions(args.dataset, args.dataset_path))
            checkpoint = load_lora_checkpoint(args.checkpoint_path) if args.resume else None
            if checkpoint:
                check_resumable(checkpoint, base, args, len(train_records))
            seed = (checkpoint or {}).get("seed", args.seed)
            seed = seed if seed is not None else random.randrange(2**31)
            torch.manual_seed(seed)
            model = model_from_checkpoint(base | {"model_args": base["model_args"] | {"dropout": args.dropout}},
                                          args.base_model_path)
        except (ValueError, FileNotFoundError, ConnectionError) as error:
            sys.exit(f"instruction-tune.py: error: {error}")
        add_lora(model, args.rank, args.alpha, args.dropout)

        train_samples, test_samples = (
            InstructionSamples(records, ALPACA, block_size, args.mask_input, model.padding_index)
            for records in (train_records, test_records)
        )
        num_truncated = train_samples.num_truncated + test_samples.num_truncated
        if num_truncated:
            print(f"{num_truncated} samples are longer than the {block_size}-token context: "
                  f"the start of their prompt is cut off")
        instruction_tune(args, model, base, seed, train_samples, test_samples, checkpoint)


def epoch_order(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """A shuffle that depends only on the seed and the epoch (mixed into one generator seed, below 2**63), so a
    resumed run sees the same order without saving it."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**63))


def instruction_tune(args, model: LightGPT, base: dict, seed: int, train_samples: InstructionSamples,
                     test_samples: InstructionSamples, checkpoint: dict | None) -> None:
    """Train the adapters of a model whose base is frozen; save them with what generation needs to use them."""
    device = torch.device(args.device)
    model.to(device)
    dtype = compute_dtype(args.precision, device)
    training_model = parallelize(model, device, args.activation_checkpointing, compiles(args.compile, device))
    scaler = gradient_scaler(device, dtype)
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=args.learning_rate, fused=device.type == "cuda")

    samples_per_step = args.batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_samples) / samples_per_step)
    step = 0
    if checkpoint:
        load_lora_state_dict(model, checkpoint["lora"])
        if checkpoint.get("optimizer"):
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            note_optimizer_starts_afresh(args.checkpoint_path)
        if checkpoint.get("rng"):
            restore_rng_state(checkpoint["rng"][0], device)
        restore_scaler(scaler, checkpoint.get("grad_scaler"))
        step = checkpoint.get("step", 0)
        print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")

    eval_batches = weighted_by_targets([test_samples.batch(indices.tolist())
                                        for indices in torch.arange(len(test_samples)).split(args.batch_size)],
                                       model.padding_index)
    print(f"LoRA: {model.num_trainable_params:,} trainable adapter parameters on a frozen base of "
          f"{sum(parameter.numel() for parameter in model.parameters()) - model.num_trainable_params:,}; "
          f"{len(train_samples)} training and {len(test_samples)} held-out instructions, "
          f"{steps_per_epoch} steps per epoch")

    def micro_batches_at(step: int) -> list[tuple]:
        epoch, position = divmod(step, steps_per_epoch)
        indices = epoch_order(seed, epoch, len(train_samples))[position * samples_per_step:][:samples_per_step]
        return weighted_by_targets([train_samples.batch(chunk.tolist()) for chunk in indices.split(args.batch_size)],
                                   model.padding_index)

    base_fingerprint = weights_fingerprint(base["model"])

    def save(step: int, epoch: int) -> None:
        save_atomically(training_checkpoint(
            base["model_args"], base["block_size"], optimizer.state_dict(), step, epoch, [rng_state(device)],
            vars(args) | {"seed": seed}, grad_scaler=scaler.state_dict(),
            lora_args={"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout},
            base_model_path=str(Path(args.base_model_path).resolve()), base_fingerprint=base_fingerprint,
            prompt_template=ALPACA.to_dict(), lora=lora_state_dict(model), num_train_samples=len(train_samples),
            seed=seed,
        ), args.checkpoint_path)

    train(training_model, optimizer, micro_batches_at, eval_batches, save, args, start_step=step,
          steps_per_epoch=steps_per_epoch, dtype=dtype, scaler=scaler,
          padding_index=model.padding_index, unit="samples", units_per_epoch=len(train_samples),
          description="Instruction-tuning", saved_what="adapters", program="instruction-tune.py")


if __name__ == "__main__":
    main()
