"""Benchmark LightGPT side by side with HuggingFace's GPT-2 of the same shape, in one run.

Training throughput, MFU and peak memory, generation and beam search, corpus preparation and activation
checkpointing. Machines are noisy, so the two models' runs are interleaved step by step and each figure comes
with the ratio LightGPT / GPT-2 measured in the same run.
"""

import argparse
import contextlib
import functools
import json
import multiprocessing
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from argparse import BooleanOptionalAction
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from corpora import wikipedia_documents
from devices import (
    PRECISION_NAMES,
    PRECISIONS,
    autocast,
    compiles,
    compute_dtype,
    gradient_scaler,
    peak_tflops,
)
from flags import (
    ArgumentParser,
    add_compile_argument,
    add_device_argument,
    add_model_arguments,
    add_precision_argument,
    model_config,
    non_negative_int,
    positive_float,
    positive_int,
    process_count,
    seed,
)
from distributed import (
    autocast_unless_sharded,
    check_launch,
    distributed,
    exit_rank,
    gradient_sync,
    launch_rank,
    launched_by_torchrun,
    parallelize,
    rank,
    world_size,
)
from conversations import CHATML
from evaluation import NUM_ENDINGS, Item, item_rows, score_hellaswag
from finetuning import preference_loss
from generation import ChatSession, beam_search, generate
from lora import add_lora
from model import LightGPT
from optimizers import build_optimizer
from preparation import prepare_corpus
from profiling import (
    RU_MAXRSS_UNIT,
    interleaved_seconds,
    kept_between_micro_batches,
    peak_resident_bytes,
    peak_step_bytes,
    synchronize,
    timed,
)
from sizing import training_flops_per_token
from tokenizer import CHAT_VOCABULARY_SIZE, load_tokenizer
from training import language_model_loss, optimizer_step

R50K_VOCABULARY_SIZE = 50257
LEARNING_RATE = 3e-3  # pre-train.py's default peak; the rate does not change what a step costs
PARTS = ("train", "generate", "beam_search", "chat", "preference", "data", "checkpointing", "accumulation", "eval",
         "serve")
CHAT_QUESTION = "Tell me something about the history of the city where you were born, in a few sentences."


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Benchmark LightGPT against HuggingFace's GPT2LMHeadModel of the same depth, width, "
                            "heads, vocabulary and context, with the same batch, optimizer and dtype. Prints a table, "
                            "or JSON lines.")
    parser.add_argument("--parts", nargs="+", default=["train"], choices=PARTS,
                        help="What to measure: training, generation (with and without the KV cache), beam search, "
                        "chat turns (the cache kept across turns or the conversation recomputed), a DPO step against "
                        "an SFT step on LoRA, corpus preparation, activation checkpointing, HellaSwag scoring batched "
                        "and one ending at a time, serve.py under concurrent streaming clients; alone and under "
                        "torchrun, FSDP2's gradient accumulation.")
    add_model_arguments(parser, dropout=0.0)
    parser.add_argument("--vocabulary_size", type=positive_int, default=R50K_VOCABULARY_SIZE,
                        help="The vocabulary of both models (default: r50k_base's, the tokenizer pre-train.py uses).")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="The number of samples in every training step.")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"),
                        help="The optimizer of both models, built as pre-train.py builds it.")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="Timed training steps of each model (the reported figure is the median step).")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="Untimed training steps of each model first.")
    add_precision_argument(parser)
    add_compile_argument(parser)
    parser.add_argument("--variants", nargs="+", type=variant, default=None,
                        help="Train in several settings in one run, their steps interleaved: each a precision, "
                        "alone or with +compile, e.g. fp32 fp32+compile bf16 bf16+compile (default: the one that "
                        "--precision and --compile set).")
    parser.add_argument("--gpt2", action=BooleanOptionalAction, default=True,
                        help="Measure HuggingFace's GPT-2 side by side (needs transformers, see requirements-dev.txt).")
    parser.add_argument("--peak_tflops", type=positive_float, default=None,
                        help="The device's peak TFLOPS for MFU (default: a GPU's from a table by its name, else "
                        "measured: the best throughput of a large square matrix product in the run's dtype).")
    parser.add_argument("--generation_lengths", type=positive_int, nargs="+", default=[128, 1024],
                        help="The numbers of tokens to generate after the prompt.")
    parser.add_argument("--prompt_length", type=positive_int, default=16,
                        help="The number of (random) prompt tokens for generation and beam search.")
    parser.add_argument("--beam_width", type=positive_int, default=16,
                        help="The number of sequences beam search keeps.")
    parser.add_argument("--num_candidates", type=positive_int, default=3,
                        help="The number of sequences beam search returns.")
    parser.add_argument("--beam_tokens", type=positive_int, default=64,
                        help="The number of tokens beam search generates.")
    parser.add_argument("--serve_clients", type=positive_int, nargs="+", default=[1, 4, 16],
                        help="The numbers of concurrent streaming clients of serve.py to measure.")
    parser.add_argument("--serve_tokens", type=positive_int, default=96,
                        help="The tokens each serve.py client asks for after its --prompt_length prompt.")
    parser.add_argument("--chat_turns", type=positive_int, default=10,
                        help="The turns of the chat measurement; the last is timed against the first.")
    parser.add_argument("--reply_tokens", type=positive_int, default=32,
                        help="The length of every reply in the chat measurement.")
    parser.add_argument("--data_tokens", type=positive_int, default=50_000_000,
                        help="The size in tokens of the synthetic Parquet corpus whose whole preparation is measured, "
                        "and of a quarter of it, to show that memory does not grow with the corpus.")
    parser.add_argument("--num_dataset_processes", type=process_count, default=2,
                        help="The processes that tokenize the corpus, as pre-train.py's flag.")
    parser.add_argument("--micro_batches", type=positive_int, default=4,
                        help="Micro-batches per process in each step of the accumulation measurement.")
    parser.add_argument("--checkpointing_layers", type=positive_int, default=24,
                        help="The depth of the model whose peak memory is measured with and without checkpointing.")
    parser.add_argument("--eval_items", type=positive_int, default=64,
                        help="The HellaSwag-shaped items (made of Wikipedia text) scored by the eval part.")
    parser.add_argument("--eval_batch_size", type=positive_int, default=32,
                        help="The sequences scored in one forward pass when batched, as evaluate.py's --batch_size.")
    add_device_argument(parser)
    parser.add_argument("--num_threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: torch's). On cores that other processes "
                        "share, 1 avoids stalling every operator while a descheduled thread catches up.")
    parser.add_argument("--seed", type=seed, default=0, help="The seed for the weights and the random tokens.")
    parser.add_argument("--json", action="store_true",
                        help="Print one JSON object per measurement and line instead of the table.")
    return parser


def variant(text: str) -> tuple[str, bool]:
    """A training setting of --variants: (precision, compiled)."""
    precision, plus, compiled = text.partition("+")
    if precision not in ("auto", *PRECISIONS) or (plus and compiled != "compile"):
        raise argparse.ArgumentTypeError(f"must be auto, fp32, bf16 or fp16, alone or with +compile, got {text!r}")
    return precision, bool(plus)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first combination of flags that cannot work."""
    model_config(args, args.vocabulary_size, args.vocabulary_size - 1)
    if ("accumulation" in args.parts) != launched_by_torchrun() or launched_by_torchrun() and len(args.parts) > 1:
        raise ValueError("--parts: accumulation is measured alone, under torchrun with two processes or more; "
                         "the other parts in one process")
    check_launch(args.device)
    if "serve" in args.parts and args.prompt_length + args.serve_tokens > args.block_size:
        raise ValueError(f"--serve_tokens: {args.serve_tokens} after a prompt of --prompt_length {args.prompt_length} "
                         f"do not fit in --block_size {args.block_size}")
    if "eval" in args.parts and args.vocabulary_size < R50K_VOCABULARY_SIZE:
        raise ValueError(f"--parts eval scores text in r50k_base's tokens: --vocabulary_size must be at least "
                         f"{R50K_VOCABULARY_SIZE}, got {args.vocabulary_size}")
    if args.gpt2 and {"train", "generate", "beam_search"} & set(args.parts):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ValueError("--gpt2: the transformers package is not installed; run: "
                             "pip install -r requirements-dev.txt, or pass --no-gpt2") from None


@dataclass
class Measurement:
    """One row of the table and one JSON line: LightGPT's figure and, side by side, GPT-2's and their ratio."""

    metric: str
    value: float
    unit: str
    gpt2_value: float | None = None
    higher_is_better: bool = True
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        record = {"metric": self.metric, "value": self.value, "unit": self.unit} | self.details
        if self.gpt2_value is not None:
            ratio = self.value / self.gpt2_value
            record |= {"gpt2_value": self.gpt2_value, "ratio": ratio if self.higher_is_better else 1 / ratio}
        return record


def lightgpt(args: argparse.Namespace, num_layers: int | None = None) -> LightGPT:
    torch.manual_seed(args.seed)
    config = model_config(args, args.vocabulary_size, args.vocabulary_size - 1)
    if num_layers:
        config.num_layers = num_layers
    return LightGPT(config).to(args.device)


def gpt2(args: argparse.Namespace, context: int):
    """HuggingFace's GPT-2 of LightGPT's depth, width, heads, MLP width and vocabulary, with its own init."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    ours = model_config(args, args.vocabulary_size, args.vocabulary_size - 1)
    config = GPT2Config(
        vocab_size=ours.vocabulary_size,
        n_positions=context,
        n_embd=ours.embedding_dimensions,
        n_layer=ours.num_layers,
        n_head=ours.num_heads,
        n_inner=ours.feed_forward_ratio * ours.embedding_dimensions,
        resid_pdrop=ours.dropout,
        embd_pdrop=ours.dropout,
        attn_pdrop=ours.dropout,
        bos_token_id=ours.eos_index,
        eos_token_id=ours.eos_index,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config).to(args.device)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer of --optimizer as pre-train.py builds it (optimizers.build_optimizer), at its default rate."""
    return build_optimizer(args.optimizer, model.parameters(), LEARNING_RATE, torch.device(args.device))


def training_step(model, optimizer, batch: tuple[torch.Tensor, torch.Tensor], args, is_gpt2: bool,
                  dtype: torch.dtype, compile: bool) -> Callable:
    """One forward, backward and optimizer step in dtype, as pre-train.py steps: autocast, fp16's loss scaling
    and, when compile is set, each block compiled. GPT-2 shifts its labels itself, so it is given x as labels."""
    if compile:
        compile_blocks(model, is_gpt2)
    device = torch.device(args.device)
    scaler = gradient_scaler(device, dtype)
    x, y = batch

    def step() -> None:
        with autocast(device, dtype):
            loss = model(input_ids=x, labels=x, use_cache=False).loss if is_gpt2 else model(x, y)[1]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def compile_blocks(model, is_gpt2: bool) -> None:
    """Compile each of GPT-2's blocks, or LightGPT's as pre-train.py does, so that both are compiled alike."""
    if is_gpt2:
        for block in model.transformer.h:
            block.compile()
    else:
        parallelize(model, next(model.parameters()).device, model.activation_checkpointing, compile=True)


def random_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, args.vocabulary_size, (args.batch_size, args.block_size + 1),
                           generator=torch.Generator().manual_seed(args.seed))
    return tokens[:, :-1].to(args.device), tokens[:, 1:].to(args.device)


def peak_for_mfu(args: argparse.Namespace, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak TFLOPS in dtype and where the figure comes from: --peak_tflops, a GPU's datasheet
    (devices.GPU_PEAK_TFLOPS), or measured on this device in this run."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "flag"
    device = torch.device(args.device)
    peak = peak_tflops(device, dtype)
    if peak is not None:
        return peak, "table"
    return measured_matmul_tflops(device, dtype), "measured"


@functools.cache
def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best throughput of square matrix products in dtype on this device, with the run's threads: what this
    machine can do at best. The products grow from 512 wide until one takes a quarter of a second (or 8192)."""
    best, size = 0.0, 512
    while True:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        a @ b  # the first product allocates and chooses its kernels
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            seconds = time.perf_counter() - start
            best = max(best, 2 * size**3 / seconds / 1e12)
        if seconds > 0.25 or size >= 8192:
            return best
        size *= 2


def model_flops_utilization(tokens_per_second: float, args: argparse.Namespace, dtype: torch.dtype,
                            details: dict) -> Measurement:
    """Achieved FLOPs (the sizing module's training FLOPs per token) as a share of the device's peak in dtype."""
    peak, source = peak_for_mfu(args, dtype)
    config = model_config(args, args.vocabulary_size, args.vocabulary_size - 1)
    flops_per_token = training_flops_per_token(
        config.vocabulary_size, args.block_size, config.embedding_dimensions, config.num_layers,
        config.feed_forward_ratio, config.num_kv_heads * config.head_dimensions,
    )
    mfu = tokens_per_second * flops_per_token / (peak * 1e12)
    return Measurement("train_mfu", 100 * mfu, "%",
                       details=details | {"peak_tflops": float(f"{peak:.4g}"), "peak": source})


def measure_training(args: argparse.Namespace) -> list[Measurement]:
    """Each of --variants' settings for LightGPT and, in the same setting, GPT-2, all their steps interleaved."""
    device = torch.device(args.device)
    batch = random_batch(args)
    models, steps = {}, {}
    for dtype, compile in args.variants:
        for name in ("lightgpt", "gpt2") if args.gpt2 else ("lightgpt",):
            model = lightgpt(args) if name == "lightgpt" else gpt2(args, args.block_size)
            optimizer = make_optimizer(model, args)
            models[name, dtype, compile] = model, optimizer
            steps[name, dtype, compile] = training_step(model, optimizer, batch, args, name == "gpt2", dtype, compile)
    first_seconds = {key: timed(step, device)[1] for key, step in steps.items()}  # with compiling, if any
    seconds = interleaved_seconds(steps, args.steps, max(0, args.warmup - 1), device, "Training")
    peaks = {key: peak_step_bytes(steps[key], *models[key], device) for key in steps}
    parameters = {name: sum(p.numel() for p in model.parameters() if p.requires_grad)
                  for (name, *_), (model, _) in models.items()}
    rows = [Measurement("parameters", parameters["lightgpt"], "count", parameters.get("gpt2"), higher_is_better=False)]
    for dtype, compile in args.variants:
        ours, theirs = ("lightgpt", dtype, compile), ("gpt2", dtype, compile)
        setting = {"precision": PRECISION_NAMES[dtype], "compile": compile}
        tokens_per_second = {key: args.batch_size * args.block_size / seconds[key] for key in (ours, theirs)
                             if key in seconds}
        rows += [
            Measurement("train_tokens_per_s", tokens_per_second[ours], "tokens/s", tokens_per_second.get(theirs),
                        details={"batch_size": args.batch_size, "block_size": args.block_size} | setting),
            Measurement("train_first_step_seconds", first_seconds[ours], "s", first_seconds.get(theirs),
                        higher_is_better=False, details=setting),
            Measurement("train_peak_memory", peaks[ours], "bytes", peaks.get(theirs), higher_is_better=False,
                        details=setting | {"method": "cuda_max_memory_allocated" if device.type == "cuda"
                                           else "live_tensor_bytes"}),
            model_flops_utilization(tokens_per_second[ours], args, dtype, setting),
        ]
    return rows


def measure_generation(args: argparse.Namespace) -> list[Measurement]:
    device = torch.device(args.device)
    model = lightgpt(args).to(args.dtype).eval()  # as generate.py loads it
    longest = args.prompt_length + max(args.generation_lengths)
    hf = gpt2(args, longest).to(args.dtype).eval() if args.gpt2 else None
    prompt = torch.randint(0, args.vocabulary_size - 1, (args.prompt_length,),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    top_k = min(500, args.vocabulary_size)  # generate's default, as far as the vocabulary allows
    rows = []
    for length in tqdm(args.generation_lengths, desc="Generation", unit="length", file=sys.stderr):
        context = args.prompt_length + length
        runs = {
            "greedy": lambda: sum(1 for _ in generate(model, prompt, length, top_k=1, block_size=context)),
            "sample": lambda: sum(1 for _ in generate(model, prompt, length, top_k=top_k, block_size=context)),
            "uncached": lambda: sum(
                1 for _ in generate(model, prompt, length, top_k=top_k, block_size=context, use_cache=False)
            ),
        }
        if hf is not None:
            # min_new_tokens keeps GPT-2 from stopping early; LightGPT counts the tokens it actually made.
            settings = dict(max_new_tokens=length, min_new_tokens=length, pad_token_id=args.vocabulary_size - 1)
            runs["gpt2_greedy"] = lambda: hf.generate(prompt[None], do_sample=False, **settings).size(1) - len(prompt)
            runs["gpt2_sample"] = lambda: hf.generate(prompt[None], do_sample=True, top_k=top_k, top_p=0.9,
                                                      **settings).size(1) - len(prompt)
        if length == args.generation_lengths[0]:
            for run in runs.values():  # warm up (first calls allocate and dispatch slowly)
                run()
        speed = {}
        for name, run in runs.items():
            tokens, seconds = timed(run, device)
            speed[name] = tokens / seconds
        details = {"tokens": length, "prompt_tokens": args.prompt_length}
        for mode in ("greedy", "sample"):
            rows.append(Measurement(f"generate_{mode}_tokens_per_s", speed[mode], "tokens/s",
                                    speed.get(f"gpt2_{mode}"), details=details))
        rows.append(Measurement("generate_uncached_tokens_per_s", speed["uncached"], "tokens/s", details=details))
        rows.append(Measurement("kv_cache_speedup", speed["sample"] / speed["uncached"], "x", details=details))
    return rows


def measure_beam_search(args: argparse.Namespace) -> list[Measurement]:
    device = torch.device(args.device)
    model = lightgpt(args).to(args.dtype).eval()
    prompt = torch.randint(0, args.vocabulary_size - 1, (args.prompt_length,),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    context = args.prompt_length + args.beam_tokens

    def ours() -> int:
        candidates = beam_search(model, prompt, args.beam_tokens, beam_width=args.beam_width,
                                 num_candidates=args.num_candidates, block_size=context)
        return max(len(tokens) for tokens, _ in candidates)

    tokens, seconds = timed(ours, device)
    gpt2_speed = None
    if args.gpt2:
        hf = gpt2(args, context).to(args.dtype).eval()
        tokens_gpt2, seconds_gpt2 = timed(lambda: hf.generate(
            prompt[None], do_sample=False, num_beams=args.beam_width, num_return_sequences=args.num_candidates,
            max_new_tokens=args.beam_tokens, min_new_tokens=args.beam_tokens, length_penalty=1.0,
            pad_token_id=args.vocabulary_size - 1,
        ).size(1) - len(prompt), device)
        gpt2_speed = tokens_gpt2 / seconds_gpt2
    details = {"beam_width": args.beam_width, "tokens": args.beam_tokens}
    return [Measurement("beam_search_tokens_per_s", tokens / seconds, "tokens/s", gpt2_speed, details=details)]


def measure_preference(args: argparse.Namespace) -> list[Measurement]:
    """A DPO step of preference-tune.py (--batch_size pairs: their chosen and rejected rows, and the reference with
    the adapters off) against an SFT step of instruction-tune.py on LoRA, of --batch_size rows and of as many rows
    as the pairs have; the loss on the second half of each row. Peak memory and time, the steps interleaved."""
    device = torch.device(args.device)
    model = lightgpt(args)
    add_lora(model, 8, 1.0, 0.0)
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                  lr=LEARNING_RATE)  # as finetuning.train_adapters
    scaler = gradient_scaler(device, args.dtype)
    tokens = torch.randint(0, args.vocabulary_size, (2 * args.batch_size, args.block_size + 1),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[:, : args.block_size // 2] = model.padding_index  # the prompts
    pairs = args.batch_size
    batches = {"preference": (x, y, functools.partial(preference_loss, beta=0.1)),
               "sft": (x[:pairs], y[:pairs], language_model_loss), "sft_as_many_rows": (x, y, language_model_loss)}

    def step(inputs: torch.Tensor, targets: torch.Tensor, loss: Callable) -> Callable[[], None]:
        return lambda: optimizer_step(model, optimizer, [(inputs, targets, 1.0)], LEARNING_RATE, 1.0,
                                      autocast(device, args.dtype), scaler, loss_of=loss)

    steps = {name: step(*batch) for name, batch in batches.items()}
    steps["sft"]()  # AdamW's state, made in the first step, is then resident for every measured one
    peaks = {name: peak_step_bytes(run, model, optimizer, device) for name, run in steps.items()}
    seconds = interleaved_seconds(steps, args.steps, args.warmup, device, "Preference")
    details = {"pairs": pairs, "block_size": args.block_size, "precision": PRECISION_NAMES[args.dtype]}
    return [
        Measurement("preference_step_peak_memory", peaks["preference"], "bytes", details=details),
        Measurement("sft_step_peak_memory", peaks["sft"], "bytes", details=details),
        Measurement("preference_over_sft_peak_memory", peaks["preference"] / peaks["sft"], "x", details=details),
        Measurement("preference_over_sft_as_many_rows_peak_memory", peaks["preference"] / peaks["sft_as_many_rows"],
                    "x", details=details),
        Measurement("preference_over_sft_step_time", seconds["preference"] / seconds["sft"], "x", details=details),
        Measurement("preference_over_sft_as_many_rows_step_time", seconds["preference"] / seconds["sft_as_many_rows"],
                    "x", details=details),
    ]


def hellaswag_shaped_items(count: int, seed: int) -> list[Item]:
    """Items of HellaSwag's shape, made of the embedded Wikipedia text: a context of 40 words and four endings of
    15 words, about HellaSwag's lengths in tokens."""
    documents = [document.split() for document in wikipedia_documents() if len(document.split()) >= 55]
    generator = np.random.default_rng(seed)
    items = []
    for index in range(count):
        chosen = generator.choice(len(documents), NUM_ENDINGS, replace=False)
        context = " ".join(documents[chosen[0]][:40])
        endings = [" ".join(documents[number][40:55]) for number in chosen]
        items.append(Item(index, context, endings, 0))
    return items


def measure_eval(args: argparse.Namespace) -> list[Measurement]:
    """HellaSwag items a second, scored as evaluate.py scores them (several items' endings in a padded batch, the
    logits of the endings' tokens only) and one item at a time as build-nanogpt does (its four endings padded,
    the whole logits, then the cross entropy of the endings), alternately, on the same items."""
    device = torch.device(args.device)
    model = lightgpt(args).to(args.dtype).eval()  # as evaluate.py loads it
    tokenizer = load_tokenizer()
    items = hellaswag_shaped_items(args.eval_items, args.seed)

    def batched() -> None:
        for _ in score_hellaswag(model, tokenizer, items, args.block_size, args.eval_batch_size):
            pass

    @torch.no_grad()
    def one_at_a_time() -> None:
        for item in items:
            rows = item_rows(tokenizer, item, args.block_size)
            length = max(len(tokens) for tokens, _ in rows)
            batch = torch.zeros(NUM_ENDINGS, length, dtype=torch.long, device=device)  # (endings, longest)
            scored = torch.zeros(NUM_ENDINGS, length - 1, dtype=torch.bool, device=device)
            for row, (tokens, count) in enumerate(rows):
                batch[row, : len(tokens)] = torch.tensor(tokens)
                scored[row, len(tokens) - 1 - count : len(tokens) - 1] = True
            logits, _ = model(batch[:, :-1])  # (endings, longest - 1, vocabulary)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                       reduction="none").view_as(scored)
            (losses * scored).sum(1) / scored.sum(1)

    seconds = interleaved_seconds({"batched": batched, "one_at_a_time": one_at_a_time}, 3, 1, device,
                                  "HellaSwag scoring")
    speed = {name: len(items) / value for name, value in seconds.items()}
    details = {"items": len(items), "batch_size": args.eval_batch_size}
    return [Measurement("hellaswag_items_per_s", speed["batched"], "items/s", details=details),
            Measurement("hellaswag_one_at_a_time_items_per_s", speed["one_at_a_time"], "items/s", details=details),
            Measurement("hellaswag_batching_speedup", speed["batched"] / speed["one_at_a_time"], "x", details=details)]


def measure_serving(args: argparse.Namespace) -> list[Measurement]:
    """serve.py, in its own process, under 1, 4, 16 (--serve_clients) concurrent streaming clients each asking for
    --serve_tokens greedy tokens: the tokens per second of all clients together, and the median time to first
    token."""
    import openai

    model = lightgpt(args)
    rows = []
    with tempfile.TemporaryDirectory() as folder, served(model, args, Path(folder)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        prompts = torch.randint(0, args.vocabulary_size - 1, (max(args.serve_clients), args.prompt_length),
                                generator=torch.Generator().manual_seed(args.seed)).tolist()

        def stream(prompt: list[int]) -> tuple[float, int]:
            start, first, tokens = time.perf_counter(), None, 0
            for chunk in client.completions.create(model="lightgpt", prompt=prompt, max_tokens=args.serve_tokens,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}):
                first = first or time.perf_counter()
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
            return first - start, tokens

        stream(prompts[0])  # warm up
        for clients in tqdm(args.serve_clients, desc="Serving", unit="client count", file=sys.stderr):
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(stream, prompts[:clients]))
            seconds = time.perf_counter() - start
            details = {"clients": clients, "tokens": args.serve_tokens, "prompt_tokens": args.prompt_length}
            rows.append(Measurement("serve_tokens_per_s", sum(tokens for _, tokens in results) / seconds, "tokens/s",
                                    details=details))
            rows.append(Measurement("serve_time_to_first_token", statistics.median(t for t, _ in results), "s",
                                    higher_is_better=False, details=details))
    return rows


@contextlib.contextmanager
def served(model: LightGPT, args: argparse.Namespace, folder: Path):
    """serve.py on a free loopback port, serving the model from a checkpoint in folder, until the block ends."""
    checkpoint = folder / "model.pt"
    torch.save({"model_args": asdict(model.config), "block_size": args.block_size, "model": model.state_dict()},
               checkpoint)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[args.dtype]
    process = subprocess.Popen([sys.executable, Path(__file__).with_name("serve.py"), "--checkpoint_path", checkpoint,
                                "--port", str(port), "--device", args.device, "--precision", precision,
                                "--max_batch_size", str(max(args.serve_clients))], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        if process.poll() is not None or time.monotonic() >= deadline:
            raise RuntimeError("serve.py did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
def measure_chat(args: argparse.Namespace) -> list[Measurement]:
    """The latency of a chat turn, at equal reply lengths: the first turn, and the last with the cache kept across
    turns (chat.py) or with the conversation recomputed from its messages (a server that keeps no cache)."""
    device = torch.device(args.device)
    args.vocabulary_size = max(args.vocabulary_size, CHAT_VOCABULARY_SIZE)
    model = lightgpt(args).to(args.dtype).eval()
    session = ChatSession(model, CHATML, args.block_size, "You are a helpful assistant.", args.reply_tokens)
    session.stop_tokens = set()  # every reply runs to --reply_tokens, whatever an untrained model samples

    def turn() -> int:
        return sum(1 for _ in session.reply(CHAT_QUESTION, args.reply_tokens))

    kept, first, recomputed = [], [], []
    for _ in tqdm(range(3), desc="Chat", unit="conversation", file=sys.stderr):  # the first one warms up
        session.reset(session.system)
        first.append(timed(turn, device)[1])
        for _ in range(args.chat_turns - 2):
            turn()
        earlier = list(session.messages)
        kept.append(timed(turn, device)[1])
        session.restart(earlier)
        recomputed.append(timed(turn, device)[1])
    if session.rebuilds:
        raise ValueError(f"--chat_turns {args.chat_turns} of --reply_tokens {args.reply_tokens} outgrow --block_size "
                         f"{args.block_size}; lower them")
    details = {"turns": args.chat_turns, "reply_tokens": args.reply_tokens,
               "context_tokens": len(session.tokens) + len(session.unfed)}
    first_s, kept_s, recomputed_s = (statistics.median(values[1:]) for values in (first, kept, recomputed))
    return [
        Measurement("chat_first_turn_s", first_s, "s", higher_is_better=False, details=details),
        Measurement("chat_last_turn_kept_cache_s", kept_s, "s", higher_is_better=False, details=details),
        Measurement("chat_last_turn_recomputed_s", recomputed_s, "s", higher_is_better=False, details=details),
        Measurement("chat_last_over_first_turn", kept_s / first_s, "x", details=details),
        Measurement("chat_kept_cache_speedup", recomputed_s / kept_s, "x", details=details),
    ]


def write_synthetic_corpus(folder: Path, tokens: int, seed: int) -> Path:
    """Parquet shards of at least `tokens` tokens, in documents of about 1,000 tokens (FineWeb-Edu's mean), of words
    drawn at the frequencies of the embedded Wikipedia corpus, so that the tokenizer meets English; written a shard
    at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = np.array(" ".join(wikipedia_documents()).split(), dtype=object)
    generator = np.random.default_rng(seed)
    sample = " ".join(words[generator.integers(0, len(words), size=100_000)])
    tokens_per_word = len(load_tokenizer().encode_ordinary(sample)) / 100_000
    folder.mkdir(parents=True)
    remaining, shard = int(1.01 * tokens / tokens_per_word), 0  # 1% over the estimate: never fewer tokens
    with tqdm(total=remaining, desc="Writing a synthetic corpus", unit="word", unit_scale=True, file=sys.stderr) as bar:
        while remaining > 0:
            lengths = generator.integers(100, 1400, size=2_000)  # words; about 1,000 tokens a document on average
            lengths = lengths[: np.searchsorted(np.cumsum(lengths), remaining) + 1]
            drawn = words[generator.integers(0, len(words), size=int(lengths.sum()))]
            texts = [" ".join(document) for document in np.split(drawn, np.cumsum(lengths)[:-1])]
            pq.write_table(pa.table({"text": texts}), folder / f"{shard:05d}.parquet")
            remaining -= int(lengths.sum())
            bar.update(int(lengths.sum()))
            shard += 1
    return folder


def preparation_figures(corpus: str, dataset_path: str, processes: int) -> dict:
    """One whole preparation of the Parquet files in `corpus`, in this (fresh) process: its tokens, seconds, and
    the peak resident memory of this process and of its largest tokenizing process."""
    from corpora import resolve_text_files

    start = time.perf_counter()
    folder = prepare_corpus("text", dataset_path, processes, resolve_text_files(corpus), show_progress=False)
    seconds = time.perf_counter() - start
    meta = json.loads((folder / "meta.json").read_text())
    return {"tokens": meta["train_tokens"] + meta["test_tokens"], "seconds": seconds,
            "peak_rss": peak_resident_bytes(),
            "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RU_MAXRSS_UNIT}


def measure_data(args: argparse.Namespace) -> list[Measurement]:
    """Whole preparations (read, tokenize, write) of a synthetic corpus and of a quarter of it, each in a fresh
    process, so that its peak memory is its own: a streamed preparation's must not grow with the corpus."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for tokens in (args.data_tokens // 4, args.data_tokens):
            corpus = write_synthetic_corpus(Path(scratch) / f"corpus-{tokens}", tokens, args.seed)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh_process:
                prepared = Path(scratch) / f"prepared-{tokens}"
                figures = fresh_process.submit(preparation_figures, str(corpus), str(prepared),
                                               args.num_dataset_processes).result()
            details = {"tokens": figures["tokens"], "processes": args.num_dataset_processes}
            rows += [
                Measurement("prepare_corpus_tokens_per_s", figures["tokens"] / figures["seconds"], "tokens/s",
                            details=details),
                Measurement("prepare_corpus_peak_rss", figures["peak_rss"], "bytes", higher_is_better=False,
                            details=details),
                Measurement("prepare_corpus_worker_peak_rss", figures["worker_peak_rss"], "bytes",
                            higher_is_better=False, details=details),
            ]
            shutil.rmtree(corpus)
    return rows


def measure_checkpointing(args: argparse.Namespace) -> list[Measurement]:
    """Peak training memory and speed of a deep LightGPT with activation checkpointing on and off."""
    device = torch.device(args.device)
    batch = random_batch(args)
    peaks, steps = {}, {}
    for enabled in (False, True):
        model = lightgpt(args, args.checkpointing_layers)
        model.enable_activation_checkpointing(enabled)
        optimizer = make_optimizer(model, args)
        steps[enabled] = training_step(model, optimizer, batch, args, False, args.dtype, args.compile)
        steps[enabled]()  # the optimizer state exists from the first step on
        peaks[enabled] = peak_step_bytes(steps[enabled], model, optimizer, device)
    seconds = interleaved_seconds(steps, max(2, args.steps // 2), 0, device, "Checkpointing")
    details = {"num_layers": args.checkpointing_layers, "batch_size": args.batch_size, "block_size": args.block_size}
    return [
        Measurement("checkpointing_peak_memory", peaks[True], "bytes", details=details),
        Measurement("no_checkpointing_peak_memory", peaks[False], "bytes", details=details),
        Measurement("checkpointing_memory_fraction", peaks[True] / peaks[False], "fraction", details=details),
        Measurement("checkpointing_speed_fraction", seconds[False] / seconds[True], "fraction", details=details),
    ]


def accumulation_step(model, optimizer, batch: tuple[torch.Tensor, torch.Tensor], args,
                      reduce_every_micro_batch: bool) -> Callable:
    """One optimizer step over args.micro_batches micro-batches on this process, its gradients reduce-scattered
    after every micro-batch, or kept whole until the last one."""
    def step() -> None:
        for index in range(args.micro_batches):
            with gradient_sync(model, reduce_every_micro_batch or index == args.micro_batches - 1):
                with autocast_unless_sharded(model, torch.device(args.device), args.dtype):
                    loss = model(*batch)[1]
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_accumulation(args: argparse.Namespace) -> list[Measurement]:
    """Under torchrun: gradient accumulation under FSDP2 at sharding levels 2 and 3, the gradients reduce-scattered
    after every micro-batch or only after the last: the step time, and the gradient bytes that this process
    keeps between micro-batches, each way."""
    device = torch.device(args.device)
    batch = random_batch(args)
    rows = []
    for level in (2, 3):
        torch.manual_seed(args.seed)
        with torch.device("meta"):
            model = LightGPT(model_config(args, args.vocabulary_size, args.vocabulary_size - 1))
        training_model = parallelize(model, device, False, args.compile, level, args.dtype)
        optimizer = make_optimizer(training_model, args)
        steps = {every: accumulation_step(training_model, optimizer, batch, args, every) for every in (True, False)}
        kept = {every: kept_between_micro_batches(step, training_model) for every, step in steps.items()}
        seconds = interleaved_seconds(steps, args.steps, args.warmup, device, f"Accumulation, level {level}")
        details = {"level": level, "processes": world_size(), "micro_batches": args.micro_batches}
        for every, name in ((True, "every_micro_batch"), (False, "last_micro_batch")):
            rows.append(Measurement(f"reduce_{name}_step_seconds", seconds[every], "s", details=details))
            rows.append(Measurement(f"reduce_{name}_kept_gradients", kept[every], "bytes", details=details))
        rows.append(Measurement("reduce_every_micro_batch_speed_fraction", seconds[False] / seconds[True],
                                "fraction", details=details))
    return rows


def process_peak_memory() -> Measurement:
    """The bench process's peak resident memory, all parts and both models together (ru_maxrss)."""
    return Measurement("process_peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT, "bytes")


def formatted(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "count":
        return f"{value / 1e6:,.2f}M"
    if unit in ("x", "fraction"):
        return f"{value:.2f}{'x' if unit == 'x' else ''}"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "s":
        return f"{value:,.3f} s"
    return f"{value:,.0f} {unit}"


def print_table(rows: list[Measurement]) -> None:
    header = ("Measurement", "LightGPT", "GPT-2", "LightGPT/GPT-2")
    lines = [header]
    for row in rows:
        record = row.as_dict()
        context = ", ".join(f"{key}={value}" for key, value in row.details.items())
        lines.append((
            f"{row.metric} ({context})" if context else row.metric,
            formatted(row.value, row.unit),
            formatted(row.gpt2_value, row.unit) if row.gpt2_value is not None else "",
            f"{record['ratio']:.2f}" if "ratio" in record else "",
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
    except ValueError as error:  # under torchrun every rank finds it; rank 0 alone says it
        sys.exit(f"bench.py: error: {error}" if launch_rank() == 0 else 1)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    args.dtype = compute_dtype(args.precision, device)
    args.compile = compiles(args.compile, device)
    args.variants = [(compute_dtype(precision, device), compile) for precision, compile in args.variants or
                     [(args.precision, args.compile)]]
    measure = {
        "train": measure_training,
        "generate": measure_generation,
        "beam_search": measure_beam_search,
        "chat": measure_chat,
        "preference": measure_preference,
        "data": measure_data,
        "checkpointing": measure_checkpointing,
        "accumulation": measure_accumulation,
        "eval": measure_eval,
        "serve": measure_serving,
    }
    with distributed(args.device) as device:
        args.device = str(device)
        rows = [row for part in PARTS if part in args.parts for row in measure[part](args)]
        if device.type != "cuda":
            rows.append(process_peak_memory())
        if rank() == 0:  # under torchrun the figures are rank 0's
            print_rows(rows, args)
    exit_rank()


def print_rows(rows: list[Measurement], args: argparse.Namespace) -> None:
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    else:
        print(f"LightGPT vs GPT-2 on {args.device}, {str(args.dtype).removeprefix('torch.')}"
              f"{', compiled' if args.compile else ''}, torch {torch.__version__}")
        print_table(rows)


if __name__ == "__main__":
    main()
