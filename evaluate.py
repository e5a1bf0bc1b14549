"""Evaluate a LightGPT: HellaSwag as llm.c scores it, perplexity and bits per byte, and any task of EleutherAI's
lm-evaluation-harness."""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from corpora import resolve_text_files
from devices import compute_dtype
from evaluation import (
    HELLASWAG_ITEMS,
    HELLASWAG_REFERENCES,
    corpus_documents,
    hellaswag_items,
    hellaswag_summary,
    perplexity,
    score_hellaswag,
    text_file_documents,
)
from files import unwritable_folder, write_text_atomically
from finetuning import load_inference_model
from flags import (
    ArgumentParser,
    add_device_argument,
    add_model_path_arguments,
    add_precision_argument,
    non_empty_path,
    positive_int,
)
from tokenizer import load_tokenizer

NATIVE_TASKS = ("hellaswag", "perplexity")
INSTALL_HARNESS = "pip install -r requirements-eval.txt"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Evaluate a LightGPT checkpoint: HellaSwag (completion style, as llm.c), perplexity and "
                            "bits per byte, and any other task through EleutherAI's lm-evaluation-harness.")
    add_model_path_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["hellaswag"],
                        help="hellaswag, perplexity, or the name of an lm-evaluation-harness task (needs lm-eval: "
                        f"{INSTALL_HARNESS}).")
    parser.add_argument("--data_path", type=non_empty_path, default=None,
                        help="HellaSwag from a local file or folder instead of the hub's Rowan/hellaswag: the original "
                        "JSON lines (ctx, endings, label), or a copy of the hub's repository or Parquet file.")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="Evaluate only the first this many items of each task (documents for perplexity).")
    parser.add_argument("--batch_size", type=positive_int, default=32,
                        help="The sequences scored in one forward pass (HellaSwag: four per item).")
    parser.add_argument("--text_files", type=non_empty_path, default=None,
                        help="perplexity: the text to measure, a file, folder or glob of .txt, .json, .jsonl or "
                        ".parquet files.")
    parser.add_argument("--dataset_path", type=non_empty_path, default=None,
                        help="perplexity: a corpus folder prepared by pre-train.py (the one holding test.bin, such "
                        "as ./dataset/wikipedia), of which the held-out split is measured.")
    parser.add_argument("--context_length", type=positive_int, nargs="+", default=None,
                        help="perplexity: the window lengths to measure at, beyond the trained one too (default: "
                        "the length the model was trained with).")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="perplexity: the tokens between one window's end and the next's; only the tokens past "
                        "the overlap count (default: half a window).")
    parser.add_argument("--include_path", type=non_empty_path, nargs="+", default=None,
                        help="Folders or files of lm-evaluation-harness task YAML files, for local tasks.")
    parser.add_argument("--output_path", type=non_empty_path, default=None,
                        help="Write the results as JSON: the summaries, HellaSwag's item by item, the harness's own.")
    add_precision_argument(parser)
    add_device_argument(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """One-line ValueErrors for flags that do not go together."""
    if "perplexity" in args.tasks and (args.text_files is None) == (args.dataset_path is None):
        raise ValueError("--tasks perplexity: give the text to measure with --text_files or --dataset_path (one)")
    if args.output_path:
        check_output_path(Path(args.output_path))
    if args.data_path and not Path(args.data_path).exists():
        raise ValueError(f"--data_path {args.data_path}: no such file or folder")


def check_output_path(output: Path) -> None:
    """Before the evaluation, which can take hours: the results file must be writable where --output_path says."""
    if output.is_dir():
        raise ValueError(f"--output_path {output}: is a folder; name a file, such as {output / 'results.json'}")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise ValueError(f"--output_path {output}: its folder does not exist")
    if problem := unwritable_folder(folder):
        raise ValueError(f"--output_path {output}: {problem}")


def harness_module():
    """harness.py, which imports lm-eval, or a one-line error saying how to install it."""
    try:
        import harness
    except ModuleNotFoundError as error:
        raise ValueError(f"--tasks: tasks other than {' and '.join(NATIVE_TASKS)} run through lm-eval "
                         f"({error}); install it: {INSTALL_HARNESS}") from None
    return harness


def print_table(rows: list[tuple]) -> None:
    header = ("task", "items", "metric", "value", "stderr", "reference")
    widths = [max(len(str(row[column])) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def evaluate_hellaswag(model, tokenizer, block_size: int, args: argparse.Namespace) -> tuple[dict, list[tuple]]:
    items = hellaswag_items(args.data_path, args.limit)
    total = args.limit or (HELLASWAG_ITEMS if args.data_path is None else None)
    records = list(score_hellaswag(model, tokenizer, items, block_size, args.batch_size, show_progress=True,
                                   total=total))
    summary = hellaswag_summary(records)
    rows = [("hellaswag", summary["items"], metric, f"{summary[metric]:.4f}", f"{summary[f'{metric}_stderr']:.4f}",
             HELLASWAG_REFERENCES[metric]) for metric in ("acc", "acc_norm")]
    return summary | {"records": records}, rows


def evaluate_perplexity(model, tokenizer, block_size: int, args: argparse.Namespace) -> tuple[list[dict], list[tuple]]:
    results, rows = [], []
    for length in args.context_length or [block_size]:
        if args.text_files:
            documents = text_file_documents(resolve_text_files(args.text_files), tokenizer)
        else:
            documents = corpus_documents(Path(args.dataset_path), tokenizer)
        stride = min(args.stride or max(1, length // 2), length)
        result = perplexity(model, itertools.islice(documents, args.limit), length, stride, args.batch_size,
                            show_progress=True)
        results.append(result)
        trained = " (trained)" if length == block_size else ""
        rows += [(f"perplexity@{length}{trained}", result["tokens"], metric, f"{result[metric]:.4f}", "", "")
                 for metric in ("loss", "perplexity", "bits_per_byte")]
    return results, rows


def main() -> None:
    args = parse_args()
    try:
        validate_args(args)
        harness_tasks = [task for task in args.tasks if task not in NATIVE_TASKS]
        if harness_tasks:
            harness = harness_module()
            task_manager = harness.harness_task_manager(harness_tasks, args.include_path)
        model, block_size, _ = load_inference_model(args.checkpoint_path, args.device, args.lora_path,
                                                    compute_dtype(args.precision, torch.device(args.device)))
        tokenizer = load_tokenizer()
        results, rows = {}, []
        if "hellaswag" in args.tasks:
            results["hellaswag"], task_rows = evaluate_hellaswag(model, tokenizer, block_size, args)
            rows += task_rows
        if "perplexity" in args.tasks:
            results["perplexity"], task_rows = evaluate_perplexity(model, tokenizer, block_size, args)
            rows += task_rows
        if harness_tasks:
            lm = harness.LightGPTLM(model, tokenizer, block_size, args.batch_size, show_progress=True)
            results["harness"] = harness.run_harness(lm, harness_tasks, task_manager, args.limit)
    except (ValueError, FileNotFoundError, ConnectionError) as error:
        sys.exit(f"evaluate.py: error: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
    if rows:
        print_table(rows)
    if harness_tasks:
        from lm_eval.utils import make_table

        print(make_table(results["harness"]))
    if args.output_path:
        try:
            write_text_atomically(Path(args.output_path), json.dumps(results, indent=1, default=str))
        except OSError as error:  # a full disk, or a folder made there since: the results are printed above
            sys.exit(f"evaluate.py: error: --output_path: {error}")


if __name__ == "__main__":
    main()
