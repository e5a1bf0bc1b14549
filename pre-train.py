"""Pre-train LightGPT on a corpus of text, on one device or several (torchrun)."""

import argparse
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from torch.nn import Module

from checkpoint import (
    check_checkpoint_path,
    claimed_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint,
    load_index,
    load_shards,
    save_atomically,
    save_sharded,
    sharded_optimizer_state,
    sharded_weights,
    training_checkpoint,
)
from corpora import (
    CORPORA,
    DEFAULT_CORPUS,
    DEFAULT_SUBSET,
    SUBSET_TOKENS,
    TEXT_EXTENSIONS,
    dataset_help,
    resolve_text_files,
    subset_help,
)
from devices import available_memory, compiles, compute_dtype, gradient_scaler
from distributed import (
    REDUCE_EVERY_MICRO_BATCH,
    check_launch,
    distributed,
    exit_rank,
    first_error_of_any_rank,
    from_rank_zero,
    full_training_state,
    launch_rank,
    load_sharded_training_state,
    load_training_state,
    local_part,
    micro_batch_indices_of_this_rank,
    micro_batches_of_this_rank,
    parallelize,
    processes_on_this_machine,
    rank,
    sharded_training_state,
    sum_across_ranks,
    unwrapped,
    values_of_every_rank,
    whole_model,
    world_size,
)
from evaluation import NUM_ENDINGS, hellaswag_counts, hellaswag_items, summary_of_counts
from files import same_files, unwritable_folder
from flags import (
    ArgumentParser,
    add_model_arguments,
    add_training_arguments,
    available_cpus,
    model_config,
    non_empty_path,
    non_negative_int,
    positive_int,
    process_count,
    run_config,
)
from integrity import (
    check_finite,
    check_optimizer_state,
    check_resumable_entries,
    checked_model,
    verify_optimizer_state,
)
from model import SHAPE_FIELDS, LightGPT, LightGPTConfig
from optimizers import build_optimizer
from preparation import PreparationInterrupted, TokenWindows, corpus_folder, prepare_corpus
from run_log import check_log_dir
from sizing import Architecture, gigabytes, memory_per_device, training_flops_per_token
from tokenizer import load_tokenizer
from training import note_optimizer_starts_afresh, restore_rng_state, restore_scaler, rng_state, train

Value = TypeVar("Value")
# The processes that tokenize a corpus unless --num_dataset_processes says otherwise (fewer on fewer CPUs).
DATASET_PROCESSES = 8


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Pre-train LightGPT. Prepares the corpus once under --dataset_path, then trains, "
                            "evaluates and checkpoints. Launch with torchrun for several devices.")
    parser.add_argument("--dataset", default=DEFAULT_CORPUS, choices=tuple(CORPORA), help=dataset_help())
    parser.add_argument("--dataset_subset", default=DEFAULT_SUBSET, choices=tuple(SUBSET_TOKENS), help=subset_help())
    parser.add_argument("--max_dataset_tokens", type=positive_int, default=None,
                        help="Prepare about this many training tokens (default: all); more later continues.")
    parser.add_argument("--text_files", type=non_empty_path, default=None,
                        help="With --dataset text: a file, folder or glob (.txt, .json, .jsonl, .parquet).")
    parser.add_argument("--dataset_path", type=non_empty_path, default="./dataset",
                        help="Where tokenized corpora are stored and reused.")
    parser.add_argument("--num_dataset_processes", type=process_count, default=None,
                        help="The processes that tokenize the corpus, at most this machine's CPUs (default: "
                        f"{DATASET_PROCESSES}, or its CPUs if fewer).")
    parser.add_argument("--samples_per_epoch", type=positive_int, default=4096,
                        help="The number of training samples in each epoch.")
    parser.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"),
                        help="Adafactor keeps factored second moments (little memory); AdamW keeps two full moments.")
    parser.add_argument("--eval_samples", type=positive_int, default=256,
                        help="The number of held-out windows in every evaluation (the same windows each time).")
    add_model_arguments(parser, dropout=0.1)
    parser.add_argument("--ddp_sharding_level", type=int, default=2, choices=(0, 2, 3),
                        help="Under torchrun: 0 replicates everything (DDP); levels 2 and 3 are FSDP2: 2 shards "
                        "gradients and optimizer state, 3 the parameters too.")
    add_training_arguments(parser, learning_rate=3e-3, warmup_steps="5%", num_epochs=2145, eval_interval=10,
                           checkpoint_interval=20, checkpoint_path="./out/checkpoint.pt", what="model")
    parser.add_argument("--hellaswag_interval", type=non_negative_int, default=0,
                        help="Evaluate HellaSwag (as evaluate.py does) every this many epochs and at the end, all "
                        "ranks sharing the items; 0 turns it off.")
    parser.add_argument("--hellaswag_path", type=non_empty_path, default=None,
                        help="HellaSwag from a local file or folder, as evaluate.py's --data_path (default: the hub's "
                        "Rowan/hellaswag).")
    parser.add_argument("--hellaswag_limit", type=positive_int, default=None,
                        help="Evaluate only the first this many HellaSwag items (default: all 10,042).")
    parser.add_argument("--checkpoint_format", default="single", choices=("single", "sharded"),
                        help="single: one file, gathered on rank 0; sharded: a folder that every rank writes its "
                        "own shards into.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    global_batch = args.batch_size * args.gradient_accumulation_steps
    if args.samples_per_epoch < global_batch:
        raise ValueError(
            f"--samples_per_epoch ({args.samples_per_epoch}) must be at least --batch_size x "
            f"--gradient_accumulation_steps ({global_batch}), the samples of one optimizer step"
        )
    if args.dataset == "text" and not args.text_files:
        raise ValueError("--text_files: required with --dataset text (a file, a folder or a glob)")
    if problem := unwritable_folder(Path(args.dataset_path)):
        raise ValueError(f"--dataset_path {args.dataset_path}: {problem}")
    check_log_dir(args)
    check_checkpoint_path(args.checkpoint_path, args.resume)
    path = Path(args.checkpoint_path)
    if args.checkpoint_format == "sharded" and path.is_file():
        raise ValueError(f"--checkpoint_path {path}: is a single-file checkpoint, and --checkpoint_format sharded "
                         f"writes a folder; choose another path")
    if args.checkpoint_format == "single" and path.is_dir():
        raise ValueError(f"--checkpoint_path {path}: is a folder; use --checkpoint_format sharded for it, or name a "
                         f"file in it")
    model_args_from(args)
    check_launch(args.device)


def model_args_from(args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer()
    return asdict(model_config(args, tokenizer.n_vocab, tokenizer.eot_token))


def check_resumable(checkpoint: dict, model_args: dict, args: argparse.Namespace) -> None:
    """The checkpoint must be of the shape, corpus and optimizer the flags ask for: resuming never changes them
    silently."""
    check_resumable_entries(checkpoint, args.checkpoint_path)
    saved_args = asdict(LightGPTConfig(**checkpoint["model_args"]))
    for name, value in model_args.items():
        if saved_args[name] != value:
            raise ValueError(
                f"--resume: the checkpoint has {name}={saved_args[name]}, "
                f"the flags ask for {value}; repeat the original run's flags"
            )
    if checkpoint.get("block_size") != args.block_size:
        raise ValueError(
            f"--resume: the checkpoint was trained with --block_size {checkpoint.get('block_size')}, "
            f"the flags ask for {args.block_size}"
        )
    trained_with = checkpoint.get("args", {})
    if "dataset" in trained_with and not same_corpus(trained_with, vars(args)):
        raise ValueError(f"--resume: the checkpoint was trained on {corpus_flags(trained_with)}, the flags ask for "
                         f"{corpus_flags(vars(args))}; resume on the same corpus, or start a new run without --resume")
    optimizer = trained_with.get("optimizer", args.optimizer)
    if checkpoint.get("optimizer") and optimizer != args.optimizer:
        raise ValueError(f"--resume: the checkpoint holds the state of --optimizer {optimizer}, the flags ask for "
                         f"{args.optimizer}; repeat --optimizer {optimizer}")


def same_corpus(trained_with: dict, flags: dict) -> bool:
    if trained_with["dataset"] != flags["dataset"]:
        return False
    if trained_with.get("dataset_subset", flags["dataset_subset"]) != flags["dataset_subset"]:
        return False
    return flags["dataset"] != "text" or same_files(trained_with.get("text_files"), flags["text_files"],
                                                    TEXT_EXTENSIONS)


def corpus_flags(flags: dict) -> str:
    return f"--dataset {flags['dataset']}" + (f" --text_files {flags.get('text_files')}"
                                              if flags["dataset"] == "text" else "")


def micro_batches_of_windows(windows: TokenWindows, starts: torch.Tensor, batch_size: int) -> list[tuple]:
    """This rank's micro-batches of the windows at `starts`, as (inputs, targets, loss weight)."""
    return [(*windows.windows(batch_starts.tolist()), weight)
            for batch_starts, weight in micro_batches_of_this_rank(starts, batch_size)]


class WindowBatches:
    """This rank's micro-batches of `count` random windows, as (inputs, targets, loss weight), the same ones each
    time they are iterated over, at any batch size and at any number of ranks: window i starts where a generator
    seeded with i draws, as its micro-batch is reached, so that neither the evaluation windows nor their starts
    are ever all in memory (--eval_samples 1000000000 once asked torch.randint for 8 GB of starts up front)."""

    def __init__(self, windows: TokenWindows, count: int, batch_size: int):
        self.windows, self.count, self.batch_size = windows, count, batch_size

    def __iter__(self) -> Iterator[tuple]:
        for index, weight in micro_batch_indices_of_this_rank(-(-self.count // self.batch_size)):
            first = index * self.batch_size
            starts = [self.windows.random_starts(1, torch.Generator().manual_seed(window)).item()
                      for window in range(first, min(first + self.batch_size, self.count))]
            yield *self.windows.windows(starts), weight


def read_inputs(args: argparse.Namespace) -> tuple[TokenWindows, TokenWindows, dict]:
    """The corpus, prepared on the first run, and the model's arguments; rank 0 checks that the checkpoint to
    resume is of that model, corpus and optimizer before the corpus is prepared."""
    model_args = model_args_from(args)
    if args.resume and rank() == 0:
        check_resumable(load_index(args.checkpoint_path), model_args, args)
    text_files = resolve_text_files(args.text_files) if args.dataset == "text" else None
    processes = args.num_dataset_processes or min(DATASET_PROCESSES, available_cpus())
    corpus = prepare_corpus(args.dataset, args.dataset_path, processes, text_files,
                            subset=args.dataset_subset, max_tokens=args.max_dataset_tokens)
    vocabulary_size = model_args["vocabulary_size"]
    train_windows = TokenWindows(corpus / "train.bin", args.block_size, vocabulary_size)
    return train_windows, TokenWindows(corpus / "test.bin", args.block_size, vocabulary_size), model_args


def load_inputs(args: argparse.Namespace, device: torch.device,
                run: ExitStack) -> tuple[TokenWindows, TokenWindows, dict]:
    """read_inputs on every rank, once each rank has checked that the model fits (check_memory) and rank 0 has
    claimed the checkpoint (claim_checkpoint): each node's first process goes first and prepares the corpus, then
    the others reuse its files. When any rank meets an error, every rank stops with it, and rank 0 says it once."""
    stop_every_rank_on_error(lambda: check_memory(args, device))
    stop_every_rank_on_error(lambda: claim_checkpoint(args, run))
    first_on_its_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    inputs = None
    for my_turn in (first_on_its_node, not first_on_its_node):
        inputs = stop_every_rank_on_error(lambda: read_inputs(args) if my_turn else inputs)
    return inputs


def check_memory(args: argparse.Namespace, device: torch.device) -> None:
    """Raise a one-line ValueError, before anything is allocated, when the model's weights, gradients and
    optimizer state alone (sizing.memory_per_device) exceed the memory this process has: a certain failure.
    Activations are left out of the comparison, since torch.compile makes them smaller than the estimate."""
    config = model_args_from(args)
    architecture = Architecture(block_size=args.block_size, **{name: config[name] for name in SHAPE_FIELDS})
    memory = memory_per_device(architecture, args.batch_size, False, args.optimizer, args.activation_checkpointing,
                               args.ddp_sharding_level, world_size())
    state = memory["parameters"] + memory["gradients"] + memory["optimizer_state"]
    available = available_memory(device) // (processes_on_this_machine() if device.type == "cpu" else 1)
    if state > available:
        raise ValueError(f"this model needs about {gigabytes(memory['total'])} to train, {gigabytes(state)} of it "
                         f"for its weights, gradients and optimizer state alone, more than the "
                         f"{gigabytes(available)} available on {device}; choose a smaller model "
                         f"(see model_sizing.ipynb)")


def claim_checkpoint(args: argparse.Namespace, run: ExitStack) -> None:
    """On rank 0, which writes it: claim the checkpoint's files until `run` ends (see claimed_checkpoint), never
    to write over the --text_files or the prepared corpus the run reads."""
    if rank() == 0:
        text_files = resolve_text_files(args.text_files) if args.dataset == "text" else []
        corpus = corpus_folder(args.dataset_path, args.dataset, text_files, args.dataset_subset)
        inputs = {"--text_files": text_files, "--dataset_path": list(corpus.glob("*"))}
        run.enter_context(claimed_checkpoint(args.checkpoint_path, inputs, args.checkpoint_format == "sharded",
                                              args.resume))


def stop_every_rank_on_error(work: Callable[[], Value]) -> Value:
    """work() on this rank; when it raises a mistake of the user's on any rank, every rank stops, and rank 0 says
    it once."""
    error, result = None, None
    try:
        result = work()
    except (ValueError, OSError, ConnectionError, PreparationInterrupted) as exception:  # OSError: a full disk
        error = str(exception)
    error = first_error_of_any_rank(error)
    if error:
        sys.exit(f"pre-train.py: error: {error}" if rank() == 0 else 1)
    return result


def build_model(args: argparse.Namespace, model_args: dict, device: torch.device,
                dtype: torch.dtype) -> tuple[LightGPT, Module]:
    """The model, and the model wrapped for training. It is built on the meta device and allocated as it is
    sharded, so that under FSDP2 no rank ever holds all of it; its weights come from the current seed, the same
    at any number of processes."""
    with torch.device("meta"):
        model = LightGPT(LightGPTConfig(**model_args))
    return model, parallelize(model, device, args.activation_checkpointing, compiles(args.compile, device),
                              args.ddp_sharding_level, dtype)


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
    except ValueError as error:  # every rank finds the same mistake; rank 0 alone says it
        sys.exit(f"pre-train.py: error: {error}" if launch_rank() == 0 else 1)
    with distributed(args.device) as device, ExitStack() as run:
        pretrain(args, device, *load_inputs(args, device, run))
    exit_rank()


# What a resumed run takes from a checkpoint besides the weights and the optimizer.
PROGRESS = ("step", "sampler", "rng", "grad_scaler")


def resume(args: argparse.Namespace, training_model: Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the checkpoint at --checkpoint_path, of either format and written at any number of processes, into
    the model and the optimizer; return its progress (step, sampler, rng, grad_scaler). Its weights' names and
    shapes are checked first: a missing, unexpected or reshaped weight, or a damaged shard, stops every rank with
    one line. Its tensors are let go on return: a file is memory-mapped and read by rank 0 alone, a folder read by
    every rank, each its own shards."""
    path = args.checkpoint_path
    if is_sharded_checkpoint(path):
        index = stop_every_rank_on_error(lambda: checked_shards(path, training_model, optimizer))
        model_state, optimizer_state = sharded_training_state(training_model, optimizer)
        stop_every_rank_on_error(
            lambda: load_shards(path, index, {"model": model_state, "optimizer": optimizer_state["state"]}))
        optimizer_state["param_groups"] = index["optimizer"]["param_groups"]
        load_sharded_training_state(training_model, optimizer, model_state, optimizer_state)
        check_weights_finite(training_model, path)
        return {key: index.get(key) for key in PROGRESS}
    checkpoint = stop_every_rank_on_error(
        lambda: of_this_optimizer(checked_checkpoint(path), path, training_model, optimizer) if rank() == 0 else None)
    load_training_state(training_model, optimizer, checkpoint)
    check_weights_finite(training_model, path)
    if rank() == 0 and not checkpoint.get("optimizer"):
        note_optimizer_starts_afresh(path)
    return from_rank_zero({key: checkpoint.get(key) for key in PROGRESS} if rank() == 0 else None)


def check_weights_finite(training_model: Module, path: str) -> None:
    """Stop every rank, with one line, when the weights loaded (each rank's own shards) hold NaN or an infinity:
    a checkpoint written without checksums can hold them, and training on would only say that the loss became
    NaN."""
    weights = {name: local_part(tensor) for name, tensor in unwrapped(training_model).state_dict().items()}
    stop_every_rank_on_error(lambda: check_finite(weights, path))


def checked_checkpoint(path: str) -> dict:
    """The single-file checkpoint to resume, once its weights are known to make its model (checked_model) and
    its optimizer state to match its checksums."""
    checkpoint = load_checkpoint(path)
    checked_model(checkpoint, path)
    verify_optimizer_state(checkpoint, path)
    return checkpoint


def of_this_optimizer(checkpoint: dict, path: str, training_model: Module, optimizer: torch.optim.Optimizer) -> dict:
    """The checkpoint to resume, once its optimizer state (keyed by parameter names) is known to be this
    optimizer's (check_optimizer_state)."""
    if checkpoint.get("optimizer"):
        shapes = {name: parameter.shape for name, parameter in unwrapped(training_model).named_parameters()}
        check_optimizer_state(checkpoint["optimizer"], optimizer, shapes, path)
    return checkpoint


def checked_shards(path: str, training_model: Module, optimizer: torch.optim.Optimizer) -> dict:
    """The index of the sharded checkpoint to resume, once the weights its shards hold are known to make its
    model, and their optimizer state to be this optimizer's."""
    index = load_index(path)
    sharded_weights(path, index)
    of_this_optimizer({"optimizer": sharded_optimizer_state(path, index)}, path, training_model, optimizer)
    return index


def pretrain(args, device: torch.device, train_windows: TokenWindows, test_windows: TokenWindows,
             model_args: dict) -> None:
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

    dtype = compute_dtype(args.precision, device)
    model, training_model = build_model(args, model_args, device, dtype)
    scaler = gradient_scaler(device, dtype)
    optimizer = build_optimizer(args.optimizer, training_model.parameters(), args.learning_rate, device)

    steps_per_epoch = args.samples_per_epoch // (args.batch_size * args.gradient_accumulation_steps)
    step, saved_rng_states = 0, []
    if args.resume:
        progress = resume(args, training_model, optimizer)
        if progress["sampler"] is not None:
            sampler.set_state(progress["sampler"])
        step = progress["step"] or 0
        saved_rng_states = progress["rng"] or []
        restore_scaler(scaler, progress["grad_scaler"])
        if main_process:
            print(f"Resuming from {args.checkpoint_path} at epoch {step // steps_per_epoch + 1}, step {step}")
    # Dropout masks differ between ranks: rank 0 draws the stream a single process would, and a resumed rank
    # continues its own stream when the checkpoint has one for it (it was saved by at least as many ranks).
    if rank() < len(saved_rng_states):
        restore_rng_state(saved_rng_states[rank()], device)
    elif rank():
        torch.manual_seed(hash((seed, rank(), step)))

    eval_batches = WindowBatches(test_windows, args.eval_samples, args.batch_size)
    if main_process:
        print(f"LightGPT: {model.num_trainable_params:,} trainable parameters, {steps_per_epoch} steps per epoch"
              + (f", {world_size()} processes" if world_size() > 1 else ""))

    def micro_batches_at(step: int) -> list[tuple]:
        starts = train_windows.random_starts(args.batch_size * args.gradient_accumulation_steps, sampler)
        return micro_batches_of_windows(train_windows, starts, args.batch_size)

    def save(step: int, epoch: int) -> None:
        rng_states = values_of_every_rank(rng_state(device))
        sharded = args.checkpoint_format == "sharded"
        model_state, optimizer_state = (sharded_training_state if sharded else full_training_state)(
            training_model, optimizer)
        checkpoint = training_checkpoint(
            model_args, args.block_size, optimizer_state, step, epoch, rng_states, vars(args) | {"seed": seed},
            grad_scaler=scaler.state_dict(), model=model_state, sampler=sampler.get_state(),
        )
        if sharded:
            save_sharded(checkpoint, args.checkpoint_path)
        elif main_process:
            save_atomically(checkpoint, args.checkpoint_path)

    benchmark = stop_every_rank_on_error(lambda: hellaswag_benchmark(args)) if args.hellaswag_interval else None
    tokens_per_epoch = args.batch_size * args.gradient_accumulation_steps * args.block_size * steps_per_epoch
    config = model.config
    flops_per_token = training_flops_per_token(config.vocabulary_size, args.block_size, config.embedding_dimensions,
                                               config.num_layers, config.feed_forward_ratio,
                                               config.num_kv_heads * config.head_dimensions)
    run = run_config(args, steps_per_epoch=steps_per_epoch, unit="tokens", units_per_epoch=tokens_per_epoch,
                     description="Pre-training", saved_what="checkpoint", program="pre-train.py", dtype=dtype,
                     flops_per_unit=flops_per_token,
                     reduce_every_micro_batch=REDUCE_EVERY_MICRO_BATCH[args.ddp_sharding_level])
    train(training_model, optimizer, micro_batches_at, eval_batches, save, run, step, scaler, benchmark)


def hellaswag_benchmark(args: argparse.Namespace) -> Callable[[Module, AbstractContextManager, int, bool], dict | None]:
    """HellaSwag's acc and acc_norm every --hellaswag_interval epochs and at the end, each rank scoring its share of
    the items, which are read now, so that a bad file stops the run before it trains."""
    items = list(hellaswag_items(args.hellaswag_path, args.hellaswag_limit, flag="--hellaswag_path"))
    tokenizer = load_tokenizer()
    batch_size = max(args.batch_size, NUM_ENDINGS)

    def benchmark(training_model: Module, precision: AbstractContextManager, epoch: int, last: bool) -> dict | None:
        if epoch % args.hellaswag_interval and not last:
            return None
        training_model.eval()
        with whole_model(training_model) as model, precision:
            counts = hellaswag_counts(model, tokenizer, items, args.block_size, batch_size, rank(), world_size())
        training_model.train()
        summary = summary_of_counts(*sum_across_ranks(counts).tolist())
        return {"hellaswag/acc": summary["acc"], "hellaswag/acc_norm": summary["acc_norm"]}

    return benchmark


if __name__ == "__main__":
    main()
