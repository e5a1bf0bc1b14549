"""Instruction-tune a pre-trained LightGPT with LoRA adapters on instruction/response pairs."""

import argparse
import math
import random
import sys
from argparse import BooleanOptionalAction
from pathlib import Path

import torch
from tqdm import tqdm

from data import (
    INSTRUCTION_DATASETS,
    PROMPT_TEMPLATE,
    TOKENIZER_NAME,
    InstructionSamples,
    load_instructions,
    split_instructions,
)
from model import (
    LightGPT,
    add_lora,
    check_device,
    check_same_base,
    load_checkpoint,
    load_lora_checkpoint,
    load_lora_state_dict,
    lora_state_dict,
    trained_on_these_weights,
    weights_fingerprint,
)
from training import (
    EpochLog,
    add_runtime_arguments,
    GracefulExit,
    autocast,
    evaluate,
    learning_rate_at,
    optimizer_step,
    parallelize,
    restore_rng_state,
    rng_state,
    save_atomically,
    weighted_by_targets,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options] (see --help)",
        description="Instruction-tune a pre-trained LightGPT: train small LoRA adapters on instruction/response "
        "pairs while the base model stays frozen, and save only the adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base_model_path", default="./out/checkpoint.pt",
                        help="The pre-trained checkpoint written by pre-train.py.")
    parser.add_argument("--dataset", default="alpaca", choices=INSTRUCTION_DATASETS,
                        help="alpaca: tatsu-lab/alpaca from the HuggingFace hub (needs internet); local: your own "
                        "Alpaca-format .json or .jsonl files at --dataset_path.")
    parser.add_argument("--dataset_path", default=None,
                        help="With --dataset local: a .json or .jsonl file, a folder or a glob of them, with "
                        "records {instruction, input (optional), output}.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="The number of samples to pass through the network at a time.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=128,
                        help="The number of batches to pass through the network before updating the weights.")
    parser.add_argument("--learning_rate", type=float, default=5e-4,
                        help="The peak AdamW step size, reached after --warmup_steps and decayed by a cosine.")
    parser.add_argument("--warmup_steps", type=int, default=0,
                        help="Optimizer steps of linear learning-rate warmup before the cosine decay to a tenth.")
    parser.add_argument("--mask_input", action=BooleanOptionalAction, default=False,
                        help="Leave the prompt out of the loss, so only the response is learned.")
    parser.add_argument("--rank", type=int, default=8,
                        help="The rank of the LoRA decomposition matrices A and B.")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="The strength of the LoRA signal: each weight becomes W + alpha * B @ A.")
    parser.add_argument("--dropout", type=float, default=0.05,
                        help="The proportion of signals to send to zero during training as regularization "
                        "(in the adapters' inputs and in the frozen model).")
    parser.add_argument("--num_epochs", type=int, default=4,
                        help="The number of passes over the training instructions.")
    parser.add_argument("--eval_interval", type=int, default=1,
                        help="Evaluate the model on the held-out instructions after this many epochs.")
    parser.add_argument("--checkpoint_interval", type=int, default=1,
                        help="Save the adapters every this many epochs (and always at the end).")
    parser.add_argument("--checkpoint_path", default="./out/lora_instruction.pt",
                        help="The adapter checkpoint file; metrics go beside it as <name>.metrics.jsonl.")
    parser.add_argument("--resume", action=BooleanOptionalAction, default=False,
                        help="Resume training from the adapter checkpoint at --checkpoint_path.")
    add_runtime_arguments(parser)
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first flag that cannot work."""
    for name in ("batch_size", "gradient_accumulation_steps", "rank", "num_epochs", "eval_interval",
                 "checkpoint_interval"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    for name in ("learning_rate", "max_gradient_norm", "alpha"):
        value = getattr(args, name)
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be zero or more, got {args.warmup_steps}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dataset == "local" and not args.dataset_path:
        raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a glob)")
    if args.dataset == "alpaca" and args.dataset_path:
        raise ValueError("--dataset_path: only used with --dataset local; --dataset alpaca comes from the hub")
    if not Path(args.base_model_path).is_file():
        raise ValueError(f"--base_model_path: no checkpoint at {args.base_model_path}; run pre-train.py first")
    if args.resume and not Path(args.checkpoint_path).is_file():
        raise ValueError(f"--resume: no adapter checkpoint at --checkpoint_path {args.checkpoint_path}")
    check_device(args.device)


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
    if checkpoint["num_train_samples"] != num_train_samples:
        raise ValueError(f"--resume: the checkpoint was trained on {checkpoint['num_train_samples']} instructions, "
                         f"this dataset has {num_train_samples}; use the original dataset")


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
        base = load_checkpoint(args.base_model_path, required=("model_args", "model", "block_size"))
        train_records, test_records = split_instructions(load_instructions(args.dataset, args.dataset_path))
        checkpoint = load_lora_checkpoint(args.checkpoint_path) if args.resume else None
        if checkpoint:
            check_resumable(checkpoint, base, args, len(train_records))
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        sys.exit(f"instruction-tune.py: error: {error}")

    seed = checkpoint["seed"] if checkpoint else args.seed if args.seed is not None else random.randrange(2**31)
    torch.manual_seed(seed)
    model = LightGPT(**base["model_args"] | {"dropout": args.dropout})
    model.load_state_dict(base["model"])
    add_lora(model, args.rank, args.alpha, args.dropout)

    block_size = base["block_size"]
    train_samples, test_samples = (
        InstructionSamples(records, PROMPT_TEMPLATE, block_size, args.mask_input, model.padding_index)
        for records in (train_records, test_records)
    )
    num_truncated = train_samples.num_truncated + test_samples.num_truncated
    if num_truncated:
        print(f"{num_truncated} samples are longer than the {block_size}-token context: "
              f"the start of their prompt is cut off")
    train(args, model, base, seed, train_samples, test_samples, checkpoint)


def epoch_order(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """A shuffle that depends only on the seed and the epoch (mixed into one generator seed), so a resumed run
    sees the same order without saving it."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train(args, model: LightGPT, base: dict, seed: int, train_samples: InstructionSamples,
          test_samples: InstructionSamples, checkpoint) -> None:
    """Train the adapters of a model whose base is frozen; save them with what generation needs to use them."""
    device = torch.device(args.device)
    model.to(device)
    compile = args.compile if args.compile is not None else device.type == "cuda"
    training_model = parallelize(model, args.activation_checkpointing, compile)
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=args.learning_rate, fused=device.type == "cuda")
    precision = autocast(device, args.mixed_precision)

    samples_per_step = args.batch_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(train_samples) / samples_per_step)
    total_steps = steps_per_epoch * args.num_epochs
    step = 0
    if checkpoint:
        load_lora_state_dict(model, checkpoint["lora"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")

    eval_batches = weighted_by_targets([test_samples.batch(indices.tolist())
                                        for indices in torch.arange(len(test_samples)).split(args.batch_size)],
                                       model.padding_index)
    print(f"LoRA: {model.num_trainable_params:,} trainable adapter parameters on a frozen base of "
          f"{sum(parameter.numel() for parameter in model.parameters()) - model.num_trainable_params:,}; "
          f"{len(train_samples)} training and {len(test_samples)} held-out instructions, "
          f"{steps_per_epoch} steps per epoch")

    base_fingerprint = weights_fingerprint(base["model"])

    def save(epoch: int) -> None:
        save_atomically(
            {
                "lora_args": {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout},
                "base_model_path": str(Path(args.base_model_path).resolve()),
                "base_fingerprint": base_fingerprint,
                "model_args": base["model_args"],
                "block_size": base["block_size"],
                "tokenizer": TOKENIZER_NAME,
                "prompt_template": PROMPT_TEMPLATE,
                "lora": lora_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "num_train_samples": len(train_samples),
                "step": step,
                "epoch": epoch,
                "seed": seed,
                "rng": rng_state(),
                "args": vars(args) | {"seed": seed},
            },
            args.checkpoint_path,
        )

    exit_request = GracefulExit()
    progress = tqdm(total=total_steps, initial=step, desc="Instruction-tuning", unit="step")
    log = EpochLog(progress, Path(args.checkpoint_path).with_suffix(".metrics.jsonl"))
    model.train()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        indices = epoch_order(seed, epoch, len(train_samples))[position * samples_per_step:][:samples_per_step]
        micro_batches = weighted_by_targets([train_samples.batch(chunk.tolist())
                                             for chunk in indices.split(args.batch_size)], model.padding_index)
        learning_rate = learning_rate_at(step, total_steps, args.warmup_steps, args.learning_rate)
        try:
            step_loss, gradient_norm, _ = optimizer_step(
                training_model, optimizer, micro_batches, learning_rate, args.max_gradient_norm, precision
            )
        except FloatingPointError as error:
            progress.close()
            sys.exit(f"instruction-tune.py: error: at step {step}, {error}")
        step += 1
        log.add_step(step_loss, gradient_norm, learning_rate)

        epoch, end_of_epoch = divmod(step, steps_per_epoch)
        if end_of_epoch == 0:
            last = step == total_steps
            validation_loss = (evaluate(training_model, eval_batches, model.padding_index, precision)
                               if epoch % args.eval_interval == 0 or last else None)
            log.end_epoch(epoch, step, "samples", len(train_samples), validation_loss)
            if epoch % args.checkpoint_interval == 0 or last:
                save(epoch)
        if exit_request.requested:
            save(step // steps_per_epoch)
            progress.close()
            print(f"Stopped by signal at step {step}; adapters saved to {args.checkpoint_path}")
            return
    progress.close()
    print(f"Done: adapters saved to {args.checkpoint_path}")


if __name__ == "__main__":
    main()
