"""Export a LightGPT checkpoint for sharing: safetensors weights, config.json and a model card, and ONNX on request."""

import argparse
import importlib
import json
import logging
import signal
import sys
import warnings
from argparse import BooleanOptionalAction
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError
from torch import Tensor
from torch.nn import Module

from checkpoint import (
    DEFAULT_CHECKPOINT_PATH,
    EXPORTED_CONFIG,
    EXPORTED_WEIGHTS,
    exported_config,
    load_checkpoint,
    load_lora_checkpoint,
    model_from_checkpoint,
    write_failure,
)
from conversations import CHATML, INSTRUCTION_DATASETS, tokenizer_config
from corpora import CORPORA
from files import unwritable_folder, write_folder_atomically
from finetuning import adapter_base, adapter_on_base
from flags import ArgumentParser, non_empty_path
from integrity import context_length
from model import LightGPT
from run_log import perplexity, read_metrics
from tokenizer import TOKENIZER_NAME

ONNX_FILE = "model.onnx"
# The model card's example, as the README shows it (FOLDER: the exported folder).
USAGE = """import torch
from tokenizer import load_tokenizer  # GPT-2's BPE, offline
from generation import generate
from model import LightGPT
model, tokenizer = LightGPT.from_pretrained("FOLDER"), load_tokenizer()
print(tokenizer.decode(list(generate(model, torch.tensor(tokenizer.encode_ordinary("The Roman Empire")), 40))))
"""
ONNX_PACKAGES = ("onnx", "onnxscript")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Export a checkpoint to a folder that LightGPT.from_pretrained, the HuggingFace Hub, "
                            "generate.py and beam_search.py read: model.safetensors, config.json and a model card "
                            "(README.md), and with --onnx model.onnx.")
    parser.add_argument("--checkpoint_path", type=non_empty_path, default=None,
                        help="The checkpoint written by pre-train.py; with --lora_path, the adapter's base (default: "
                        f"{DEFAULT_CHECKPOINT_PATH}, or the base the adapter names).")
    parser.add_argument("--lora_path", type=non_empty_path, default=None,
                        help="A LoRA adapter (instruction-tune.py, preference-tune.py) to merge into the model first.")
    parser.add_argument("--output_dir", type=non_empty_path, required=True,
                        help="The folder to write: a new or an empty one.")
    parser.add_argument("--onnx", action=BooleanOptionalAction, default=False,
                        help="Also write model.onnx (needs the onnx and onnxscript packages).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError for the first flag that cannot work, before anything is loaded or written."""
    output = Path(args.output_dir)
    if output.is_file() or output.is_dir() and any(output.iterdir()):
        raise ValueError(f"--output_dir {output}: already exists and is not an empty folder; choose a new one")
    if problem := unwritable_folder(output.parent):
        raise ValueError(f"--output_dir {output}: {problem}")
    if args.onnx:
        for package in ONNX_PACKAGES:
            try:
                importlib.import_module(package)
            except ImportError:
                raise ValueError(f"--onnx: the {package} package is not installed; run: "
                                 f"pip install -r requirements-dev.txt, or export without --onnx") from None


def load_source(args: argparse.Namespace) -> tuple[LightGPT, int, dict | None, dict[str, dict]]:
    """The model to export (with --lora_path, the adapter merged into its base: --checkpoint_path, else the base
    the adapter names), its training context length, its prompt template (None unless instruction-tuned), and the
    facts of each stage of its training."""
    adapter = load_lora_checkpoint(args.lora_path) if args.lora_path else None
    if adapter:
        base, base_path = adapter_base(adapter, args.lora_path, args.checkpoint_path)
    else:
        base_path = args.checkpoint_path or DEFAULT_CHECKPOINT_PATH
        base = load_checkpoint(base_path)
    block_size = context_length(base, base_path)
    stages = {"Pre-training": training_facts(base, base_path, tokens_per_sample=block_size)}
    if not adapter:
        return model_from_checkpoint(base, base_path).eval(), block_size, None, stages
    base_label = f"--checkpoint_path {base_path}" if args.checkpoint_path else f"its base {base_path}"
    model = adapter_on_base(adapter, base, f"--lora_path {args.lora_path}", base_label)
    lora = adapter["lora_args"]
    stages["Instruction tuning"] = training_facts(adapter, args.lora_path) | {
        "method": f"LoRA rank {lora['rank']}, alpha {lora['alpha']}, merged into the weights"}
    return model, block_size, adapter["prompt_template"], stages


def training_facts(checkpoint: dict, path: str | Path, tokens_per_sample: int | None = None) -> dict:
    """The card's rows about one stage of training: its data and the data's license, how much of it the model saw
    (in tokens when tokens_per_sample is given, else in samples) and the last validation loss in the metrics file
    beside the checkpoint. What older checkpoints do not record is left out."""
    args, steps = checkpoint.get("args", {}), checkpoint.get("step")
    facts = {}
    if args.get("dataset"):
        facts["data"] = f"{args['dataset']} ({data_license(args['dataset'])})"
    if steps is not None and {"batch_size", "gradient_accumulation_steps"} <= args.keys():
        samples = steps * args["batch_size"] * args["gradient_accumulation_steps"]
        seen = f"{samples * tokens_per_sample:,} tokens" if tokens_per_sample else f"{samples:,} samples"
        facts["steps"] = f"{steps:,} ({seen})"
    metrics_path = Path(path).with_suffix(".metrics.jsonl")
    if metrics_path.is_file():
        losses = [record["validation_loss"] for _, record in read_metrics(metrics_path, "the model card's figures")
                  if isinstance(record.get("validation_loss"), float) and record["step"] <= (steps or 0)]
        if losses:
            facts["validation loss"] = f"{losses[-1]:.4f} (perplexity {perplexity(losses[-1]):,.1f})"
    return facts


def data_license(dataset: str) -> str:
    """The license of a pre-training corpus or an instruction dataset, from their registries (a model card states
    its training data's license)."""
    license = CORPORA[dataset].license if dataset in CORPORA else INSTRUCTION_DATASETS.get(dataset)
    return license or "see the data's own license"


def model_card(model: LightGPT, block_size: int, stages: dict[str, dict]) -> ModelCard:
    """A short model card: the architecture, the parameters, the tokenizer, and for each stage of training its data
    and the data's license, how much of it the model saw and its validation loss."""
    config = model.config
    rows = {
        "Architecture": f"{config.num_layers} layers, {config.embedding_dimensions} wide, {config.num_heads} heads, "
                        f"feed-forward {config.feed_forward_ratio}x; no biases, no positional embeddings, one matrix "
                        f"for the token embeddings and the output layer",
        "Parameters": f"{num_parameters(model):,}",
        "Context": f"{block_size} tokens",
        "Tokenizer": f"GPT-2's BPE (tiktoken's {TOKENIZER_NAME}), {config.vocabulary_size:,} tokens; LightGPT's "
                     f"`tokenizer.load_tokenizer()` builds it offline (`tiktoken.get_encoding` downloads it)",
    }
    for stage, facts in stages.items():
        rows |= {f"{stage} {name}": value for name, value in facts.items()}
    table = "\n".join(f"| {name} | {value} |" for name, value in rows.items())
    metadata = ModelCardData(library_name="lightgpt", pipeline_tag="text-generation", tags=["lightgpt"])
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n# LightGPT\n\nA small decoder-only Transformer trained "
                     f"with LightGPT.\n\n| | |\n| --- | --- |\n{table}\n\n## Use\n\nWith LightGPT's code: "
                     f"`LightGPT.from_pretrained(\"<this folder or Hub id>\")` (in `model.py`), or "
                     f"`python generate.py --checkpoint_path <this folder>`. `{EXPORTED_WEIGHTS}` holds the weights, "
                     f"`{EXPORTED_CONFIG}` the configuration; `{ONNX_FILE}`, where present, takes token ids (batch, "
                     f"sequence) and gives every position's logits. In Python, from LightGPT's folder:\n\n"
                     f"```python\n{USAGE.replace('FOLDER', '<this folder or Hub id>')}```\n")


def num_parameters(model: LightGPT) -> int:
    """Every parameter of the model, the tied matrix once: num_trainable_params counts only what is trainable, the
    merged layers alone once an adapter is merged."""
    return sum(parameter.numel() for parameter in model.parameters())


class Logits(Module):
    """The model as ONNX sees it: token ids in, every position's logits out."""

    def __init__(self, model: LightGPT):
        super().__init__()
        self.model = model

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.model(token_ids)[0]


def export_onnx(model: LightGPT, path: Path) -> None:
    """The model in ONNX through torch.export (dynamo), with any batch size and sequence length."""
    example = torch.zeros(2, 8, dtype=torch.long)
    dynamic = {"token_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    # Noise that means nothing here: the exporter logs each torchvision operator it skips when torchvision is
    # not installed, and torch.export warns of its own deprecated LeafSpec check.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            torch.onnx.export(Logits(model).eval(), (example,), path, dynamo=True, input_names=["token_ids"],
                              output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
    finally:
        registration.setLevel(level)


def main() -> None:
    """Export; Ctrl-C or SIGTERM stop it in one line with nothing written, and the status the signal calls for
    (128 + its number, as the training scripts' own), so that `export.py ... && next` stops there too."""
    args = parse_args()
    stopped_by = signal.SIGINT

    def stop(number: int, frame) -> None:
        nonlocal stopped_by
        stopped_by = number
        raise KeyboardInterrupt  # unwinds as Ctrl-C does, through the temporary folder's removal

    signal.signal(signal.SIGTERM, stop)
    try:
        export(args)
    except KeyboardInterrupt:
        print(f"export.py: stopped by {signal.Signals(stopped_by).name}; nothing was written to --output_dir "
              f"{args.output_dir}", file=sys.stderr)
        sys.exit(128 + stopped_by)


def export(args: argparse.Namespace) -> None:
    try:
        validate_args(args)
        model, block_size, template, stages = load_source(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"export.py: error: {error}")

    def write(folder: Path) -> None:
        model_card(model, block_size, stages).save(folder / "README.md")
        model.save_pretrained(folder, config=exported_config(model, block_size, template))
        if template and template.get("name") == CHATML.name:
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(block_size), indent=2))
        if args.onnx:
            print(f"Exporting {ONNX_FILE} (a minute or more for large models)", flush=True)
            export_onnx(model, folder / ONNX_FILE)

    try:
        write_folder_atomically(args.output_dir, write)
    except (OSError, SafetensorError) as error:  # a full disk, as safetensors reports it too
        sys.exit(f"export.py: error: --output_dir {args.output_dir}: {write_failure(error)}")
    print(f"Exported {num_parameters(model):,} parameters to {args.output_dir}")


if __name__ == "__main__":
    main()
