"""Pre-train LightGPT on a corpus of text, on one device or several (torchrun)."""

import argparse
import os
import random
import sys
import warnings
from argparse import BooleanOptionalAction
from pathlib import Path

import torch
from tqdm import tqdm

from data import CORPORA, TOKENIZER_NAME, TokenWindows, load_tokenizer, prepare_corpus, resolve_text_files
from model import LightGPT, check_device, load_checkpoint
from training import (
    Adafactor,
    ArgumentParser,
    EpochLog,
    GracefulExit,
    add_runtime_arguments,
    check_launch,
    distributed,
    evaluate,
    every_rank_s,
    exit_rank,
    first_error_of_any_rank,
    from_rank_zero,
    full_training_state,
    launch_rank,
    learning_rate_at,
    load_training_state,
    micro_batches_of_this_rank,
    optimizer_step,
    parallelize,
    precision,
    rank,
    restore_rng_state,
    rng_state,
    save_atomically,
    world_size,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        usage="%(prog)s [options] (see --help)",
        description="Pre-train LightGPT. Prepares the corpus once under --dataset_path, then trains, "
        "evaluates and checkpoints. Launch with torchrun for several devices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", default="openwebtext", choices=CORPORA,
                        help="The corpus: openwebtext (HuggingFace hub, needs internet), wikipedia and kjv "
                        "(embedded, offline), or text (your own files, see --text_files).")
    parser.add_argument("--text_files", default=None,
                        help="With --dataset text: a file, a folder or a glob of .txt, .json, .jsonl or .parquet "
                        "files (JSON and Parquet need a 'text' field).")
    parser.add_argument("--dataset_path", default="./dataset",
                        help="The folder where the tokenized corpus is stored and reused.")
    parser.add_argument("--num_dataset_processes", type=int, default=8,
                        help="The number of processes (CPUs) used to tokenize the corpus.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="The number of samples to pass through the network at a time.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=128,
                        help="The number of batches to pass through the network before updating the weights "
                        "(in total, across all data-parallel processes).")
    parser.add_argument("--samples_per_epoch", type=int, default=4096,
                        help="The number of training samples to pass through the network every epoch.")
    parser.add_argument("--learning_rate", type=float, default=5e-4,
                        help="The peak step size taken after every gradient accumulation step.")
    parser.add_argument("--warmup_steps", type=int, default=100,
                        help="Optimizer steps of linear learning-rate warmup before the cosine decay to a tenth.")
    parser.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"),
                        help="Adafactor keeps factored second moments (little memory); AdamW keeps two full moments.")
    parser.add_argument("--num_epochs", type=int, default=2145,
                        help="The number of epochs to train for.")
    parser.add_argument("--eval_interval", type=int, default=10,
                        help="Evaluate the model on the held-out split after this many epochs.")
    parser.add_argument("--eval_samples", type=int, default=256,
                        help="The number of held-out windows in every evaluation (the same windows each time).")
    parser.add_argument("--block_size", type=int, default=1024,
                        help="The number of tokens within the context window of every sample.")
    parser.add_argument("--embedding_dimensions", type=int, default=1024,
                        help="The dimensionality of the token embeddings.")
    parser.add_argument("--num_attention_heads", type=int, default=16,
                        help="The number of attention heads within every block.")
    parser.add_argument("--num_hidden_layers", type=int, default=24,
                        help="The number of attention/MLP blocks within the hidden layer of the network.")
    parser.add_argument("--feed_forward_ratio", type=int, default=4,
                        help="The width of each MLP's hidden layer as a multiple of --embedding_dimensions.")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="The proportion of signals to send to zero during training as regularization.")
    parser.add_argument("--ddp_sharding_level", type=int, default=2, choices=(0, 2, 3),
                        help="Under torchrun: 0 replicates everything (DDP), 2 shards gradients and optimizer "
                        "state (FSDP2, parameters whole from forward to backward), 3 also shards the parameters.")
    parser.add_argument("--checkpoint_interval", type=int, default=20,
                        help="Save a checkpoint every this many epochs (and always at the end).")
    parser.add_argument("--checkpoint_path", default="./out/checkpoint.pt",
                        help="The checkpoint file; metrics go beside it as <name>.metrics.jsonl.")
    parser.add_argument("--resume", action=BooleanOptionalAction, default=False,
                        help="Resume training from the checkpoint at --checkpoint_path.")
    add_runtime_arguments(parser)
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first flag that cannot work."""
    for name in (
        "batch_size", "gradient_accumulation_steps", "samples_per_epoch", "num_epochs", "eval_interval",
        "eval_samples", "block_size", "embedding_dimensions", "num_attention_heads", "num_hidden_layers",
        "feed_forward_ratio", "checkpoint_interval", "num_dataset_processes",
    ):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    for name in ("learning_rate", "max_gradient_norm"):
        value = getattr(args, name)
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be zero or more, got {args.warmup_steps}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.embedding_dimensions % args.num_attention_heads != 0:
        raise ValueError(
            f"--embedding_dimensions ({args.embedding_dimensions}) must be divisible by "
            f"--num_attention_heads ({args.num_attention_heads})"
        )
    global_batch = args.batch_size * args.gradient_accumulation_steps
    if args.samples_per_epoch < global_batch:
        raise ValueError(
            f"--samples_per_epoch ({args.samples_per_epoch}) must be at least --batch_size x "
            f"--gradient_accumulation_steps ({global_batch}), the samples of one optimizer step"
        )
    if args.dataset == "text" and not args.text_files:
        raise ValueError("--text_files: required with --dataset text (a file, a folder or a glob)")
    if args.resume and not Path(args.checkpoint_path).is_file():
        raise ValueError(f"--resume: no checkpoint at --checkpoint_path {args.checkpoint_path}")
    check_device(args.device)
    check_launch(args.device)


def model_args_from(args: argparse.Namespace) -> dict:
    return {
        "vocabulary_size": load_tokenizer().n_vocab,
        "embedding_dimensions": args.embedding_dimensions,
        "num_heads": args.num_attention_heads,
        "num_layers": args.num_hidden_layers,
        "feed_forward_ratio": args.feed_forward_ratio,
        "dropout": args.dropout,
        "eos_index": load_tokenizer().eot_token,
    }


def check_resumable(checkpoint: dict, model_args: dict, block_size: int) -> None:
    """The checkpoint must be of the shape the flags ask for: resuming never changes the model silently."""
    for name, value in model_args.items():
        if checkpoint["model_args"].get(name) != value:
            raise ValueError(
                f"--resume: the checkpoint has {name}={checkpoint['model_args'].get(name)}, "
                f"the flags ask for {value}; repeat the original run's flags"
            )
    if checkpoint.get("block_size") != block_size:
        raise ValueError(
            f"--resume: the checkpoint was trained with --block_size {checkpoint.get('block_size')}, "
            f"the flags ask for {block_size}"
        )


def micro_batches_of_windows(windows: TokenWindows, starts: torch.Tensor, batch_size: int) -> list[tuple]:
    """This rank's micro-batches of the windows at `starts`, as (inputs, targets, loss weight)."""
    return [(*windows.windows(batch_starts.tolist()), weight)
            for batch_starts, weight in micro_batches_of_this_rank(starts, batch_size)]


def read_inputs(args: argparse.Namespace) -> tuple[TokenWindows, TokenWindows, dict, dict | None]:
    """The corpus, prepared on the first run, the model's arguments and, on rank 0 alone, the checkpoint to resume."""
    text_files = resolve_text_files(args.text_files) if args.dataset == "text" else None
    corpus = prepare_corpus(args.dataset, args.dataset_path, args.num_dataset_processes, text_files)
    model_args = model_args_from(args)
    checkpoint = load_checkpoint(args.checkpoint_path) if args.resume and rank() == 0 else None
    if checkpoint:
        check_resumable(checkpoint, model_args, args.block_size)
    train_windows = TokenWindows(corpus / "train.bin", args.block_size)
    return train_windows, TokenWindows(corpus / "test.bin", args.block_size), model_args, checkpoint


def load_inputs(args: argparse.Namespace) -> tuple[TokenWindows, TokenWindows, dict, dict | None]:
    """read_inputs on every rank: each node's first process goes first and prepares the corpus, then the others
    reuse its files. When any rank meets an error, every rank stops with it, and rank 0 says it once."""
    first_on_its_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    inputs = None
    for my_turn in (first_on_its_node, not first_on_its_node):
        error = None
        if my_turn:
            try:
                inputs = read_inputs(args)
            except (ValueError, FileNotFoundError, ConnectionError) as exception:
                error = str(exception)
        error = first_error_of_any_rank(error)
        if error:
            sys.exit(f"pre-train.py: error: {error}" if rank() == 0 else 1)
    return inputs


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
    except ValueError as error:  # every rank finds the same mistake; rank 0 alone says it
        sys.exit(f"pre-train.py: error: {error}" if launch_rank() == 0 else 1)
    with distributed(args.device) as device:
        train(args, device, *load_inputs(args))
    exit_rank()


def train(args, device: torch.device, train_windows: TokenWindows, test_windows: TokenWindows, model_args: dict,
          checkpoint: dict | None) -> None:
    """Train on this process's device; under torchrun every rank runs this, and rank 0 alone prints and writes."""
    main_process = rank() == 0
    seed = from_rank_zero(args.seed if args.seed is not None else random.randrange(2**31))
    torch.manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed)
    if main_process and args.gradient_accumulation_steps % world_size():
        warnings.warn(
            f"--gradient_accumulation_steps ({args.gradient_accumulation_steps}) does not divide evenly by the "
            f"{world_size()} processes, so some run an idle pass every step; use a multiple of {world_size()}"
        )

    model = LightGPT(**model_args).to(device)
    compile = args.compile if args.compile is not None else device.type == "cuda"
    training_model = parallelize(model, args.activation_checkpointing, compile, args.ddp_sharding_level,
                                 args.mixed_precision)
    if args.optimizer == "adafactor":
        optimizer = Adafactor(training_model.parameters(), lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(training_model.parameters(), lr=args.learning_rate,
                                      fused=device.type == "cuda")
    autocast = precision(training_model, device, args.mixed_precision)

    steps_per_epoch = args.samples_per_epoch // (args.batch_size * args.gradient_accumulation_steps)
    total_steps = steps_per_epoch * args.num_epochs
    step, saved_rng_states = 0, []
    if args.resume:
        load_training_state(training_model, optimizer, checkpoint)
        progress_state = from_rank_zero({key: checkpoint[key] for key in ("sampler", "rng", "step")}
                                        if main_process else None)
        sampler.set_state(progress_state["sampler"])
        step = progress_state["step"]
        saved_rng_states = progress_state["rng"]
        if isinstance(saved_rng_states, dict):  # a checkpoint from before every rank's state was kept
            saved_rng_states = [saved_rng_states]
        if main_process:
            print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")
    # Dropout masks differ between ranks: rank 0 draws the stream a single process would, and a resumed rank
    # continues its own stream when the checkpoint has one for it (it was saved by at least as many ranks).
    if rank() < len(saved_rng_states):
        restore_rng_state(saved_rng_states[rank()])
    elif rank():
        torch.manual_seed(hash((seed, rank(), step)))

    eval_starts = test_windows.random_starts(args.eval_samples, torch.Generator().manual_seed(0))
    eval_batches = micro_batches_of_windows(test_windows, eval_starts, args.batch_size)
    metrics_path = Path(args.checkpoint_path).with_suffix(".metrics.jsonl")
    if main_process:
        print(f"LightGPT: {model.num_trainable_params:,} trainable parameters, {steps_per_epoch} steps per epoch"
              + (f", {world_size()} processes" if world_size() > 1 else ""))

    def save(epoch: int) -> None:
        rng_states = every_rank_s(rng_state())
        model_state, optimizer_state = full_training_state(training_model, optimizer)
        if not main_process:
            return
        save_atomically(
            {
                "model_args": model_args,
                "block_size": args.block_size,
                "tokenizer": TOKENIZER_NAME,
                "model": model_state,
                "optimizer": optimizer_state,
                "step": step,
                "epoch": epoch,
                "sampler": sampler.get_state(),
                "rng": rng_states,
                "args": vars(args) | {"seed": seed},
            },
            args.checkpoint_path,
        )

    exit_request = GracefulExit()
    tokens_per_epoch = args.batch_size * args.gradient_accumulation_steps * args.block_size * steps_per_epoch
    progress = tqdm(total=total_steps, initial=step, desc="Pre-training", unit="step", disable=not main_process)
    log = EpochLog(progress, metrics_path if main_process else None)
    model.train()
    while step < total_steps:
        learning_rate = learning_rate_at(step, total_steps, args.warmup_steps, args.learning_rate)
        starts = train_windows.random_starts(args.batch_size * args.gradient_accumulation_steps, sampler)
        try:
            step_loss, gradient_norm, stop_requested = optimizer_step(
                training_model, optimizer, micro_batches_of_windows(train_windows, starts, args.batch_size),
                learning_rate, args.max_gradient_norm, autocast, exit_request.requested,
            )
        except FloatingPointError as error:
            progress.close()
            sys.exit(f"pre-train.py: error: at step {step}, {error}" if main_process else 1)
        step += 1
        log.add_step(step_loss, gradient_norm, learning_rate)

        epoch, end_of_epoch = divmod(step, steps_per_epoch)
        if end_of_epoch == 0:
            validation_loss = None
            if epoch % args.eval_interval == 0 or step == total_steps:
                validation_loss = evaluate(training_model, eval_batches, model.padding_index, autocast)
            log.end_epoch(epoch, step, "tokens", tokens_per_epoch, validation_loss)
            if epoch % args.checkpoint_interval == 0 or step == total_steps:
                save(epoch)
        if stop_requested:
            save(step // steps_per_epoch)
            progress.close()
            if main_process:
                print(f"Stopped by signal at step {step}; checkpoint saved to {args.checkpoint_path}")
            return
    progress.close()
    if main_process:
        print(f"Done: checkpoint saved to {args.checkpoint_path}")


if __name__ == "__main__":
    main()
