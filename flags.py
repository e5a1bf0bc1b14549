"""The command-line flags the scripts share, each defined once, with validators that name the flag."""

import argparse
import math
import os
import re
import sys
import warnings
from argparse import BooleanOptionalAction
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from devices import PRECISIONS, best_device, check_device
from distributed import launch_rank
from generation import REPEAT_PENALTIES
from model import SHAPE_FIELDS, LightGPTConfig
from training import RunConfig

# The seed's names of the model flags that LightGPTConfig names otherwise; the other flags are named as its fields.
SEED_FLAG_NAMES = {"num_heads": "num_attention_heads", "num_layers": "num_hidden_layers"}
# Each model flag and the LightGPTConfig field it sets: the shape (the vocabulary comes from the tokenizer) and
# the dropout.
CONFIG_FIELDS = {SEED_FLAG_NAMES.get(name, name): name for name in (*SHAPE_FIELDS, "dropout")
                 if name != "vocabulary_size"}


def one_line_warning(message, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    """A warning of ours as one line, '<script>: warning: <message>', as errors are shown, without the source
    line that Python quotes; other libraries' warnings as Python shows them."""
    if Path(filename).resolve().parent == Path(__file__).resolve().parent:
        return f"{Path(sys.argv[0]).name}: warning: {message}\n"
    return python_warning(message, category, filename, lineno, line)


python_warning, warnings.formatwarning = warnings.formatwarning, one_line_warning  # every script imports flags


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each help text, unless the text says its own default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default" in action.help or action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the defaults shown in --help, except that under torchrun only rank 0 prints a
    usage error: every rank meets it."""

    def __init__(self, description: str):
        super().__init__(usage="%(prog)s [options] (see --help)", description=description,
                         formatter_class=DefaultsOnceHelpFormatter)

    def error(self, message: str) -> NoReturn:
        if launch_rank() == 0:
            super().error(message)
        sys.exit(2)


def _number(kind: type, text: str, description: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text, "zero or a positive integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def steps_or_percentage(text: str) -> int | float:
    """A number of optimizer steps ("100"), or a percentage of a run's steps ("5%"), returned as a fraction."""
    if text.endswith("%"):
        try:
            value = float(text[:-1]) / 100
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"must be a percentage from 0% to 100%, got {text!r}")
        return value
    value = _number(int, text, "a number of steps or a percentage such as 5%")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero steps or more, got {value}")
    return value


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or taskset narrows), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_count(text: str) -> int:
    """A number of worker processes: at least 1, at most this machine's CPUs, beyond which they only slow the work
    down (and a mistyped 1000000 would start processes until the machine stops)."""
    value = positive_int(text)
    if value > (cpus := available_cpus()):
        raise argparse.ArgumentTypeError(f"must be at most the {cpus} CPUs of this machine, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a positive number")
    if not 0 < value < math.inf:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return value


def float_in(low: float, high: float, low_excluded: bool = False) -> Callable[[str], float]:
    """The type of a float flag whose arithmetic carries only [low, high] (or (low, high]): beyond it, a float
    overflows or divides by zero."""
    interval = f"{'(' if low_excluded else '['}{low:g}, {high:g}]"

    def number(text: str) -> float:
        value = _number(float, text, f"a number in {interval}")
        if not (low < value if low_excluded else low <= value) or not value <= high:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return value

    return number


# The largest learning rate or LoRA alpha: the optimizers multiply it (AdamW by 10 on its first step) in float32,
# which ends at 3.4e38.
LARGEST_FACTOR = 1e30


def fraction(text: str) -> float:
    """A proportion such as a dropout rate: in [0, 1)."""
    value = _number(float, text, "a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def probability(text: str) -> float:
    """A probability mass such as top_p: in (0, 1]."""
    value = _number(float, text, "a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def seed(text: str) -> int:
    """A random-number seed, in [0, 2**63): what every generator here accepts."""
    value = _number(int, text, "an integer in [0, 2**63)")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def non_empty_path(text: str) -> str:
    """A file or folder flag's value: an empty one would be Path('.'), the current folder, which no one means."""
    if not text:
        raise argparse.ArgumentTypeError("must name a file or folder, got an empty path")
    return text


def device(text: str) -> str:
    try:
        check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, default=best_device(),
                        help="The device to run on: cuda, mps or cpu.")


class MixedPrecisionAlias(argparse.Action):
    """--mixed_precision and --no-mixed_precision, the flags of earlier versions: --precision auto and fp32."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, "fp32" if option_string.startswith("--no-") else "auto")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                        help="auto: bf16 where native, else fp16 on CUDA, else fp32.")
    parser.add_argument("--mixed_precision", "--no-mixed_precision", dest="precision", action=MixedPrecisionAlias)


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=BooleanOptionalAction, default=None,
                        help="torch.compile each block (default: on CUDA only; 5-10 s more at start-up).")


def add_model_arguments(parser: argparse.ArgumentParser, dropout: float) -> None:
    """The shape of the model to build; model_config turns them into a LightGPTConfig."""
    parser.add_argument("--block_size", type=positive_int, default=1024,
                        help="The number of tokens within the context window of every sample.")
    parser.add_argument("--embedding_dimensions", type=positive_int, default=1024,
                        help="The dimensionality of the token embeddings.")
    parser.add_argument("--num_attention_heads", type=positive_int, default=16,
                        help="The number of attention heads within every block.")
    parser.add_argument("--num_kv_heads", type=positive_int, default=None,
                        help="The number of key/value heads, each shared by a group of query heads (grouped-query "
                        "attention, a smaller KV cache); it must divide --num_attention_heads. None: one per head.")
    parser.add_argument("--num_hidden_layers", type=positive_int, default=24,
                        help="The number of attention/MLP blocks.")
    parser.add_argument("--feed_forward_ratio", type=positive_int, default=4,
                        help="The width of each MLP's hidden layer as a multiple of --embedding_dimensions.")
    parser.add_argument("--dropout", type=fraction, default=dropout,
                        help="The proportion of signals to send to zero during training as regularization.")


def model_config(args: argparse.Namespace, vocabulary_size: int, eos_index: int) -> LightGPTConfig:
    """The LightGPTConfig that add_model_arguments' flags ask for; a one-line ValueError in the flags' names
    when they do not make a model (LightGPTConfig checks, for example, that the heads divide the width)."""
    fields = {field: getattr(args, flag) for flag, field in CONFIG_FIELDS.items()}
    try:
        return LightGPTConfig(vocabulary_size=vocabulary_size, eos_index=eos_index, **fields)
    except ValueError as error:
        message = str(error)
        for flag, field in CONFIG_FIELDS.items():
            message = re.sub(rf"\b{field}\b", f"--{flag}", message)
        raise ValueError(message) from None


def add_training_arguments(parser: argparse.ArgumentParser, *, learning_rate: float, warmup_steps: int | str,
                           num_epochs: int, eval_interval: int, checkpoint_interval: int,
                           checkpoint_path: str, what: str) -> None:
    """The flags of a training run, the same in pre-training and instruction tuning, with each script's defaults;
    `what` names what the checkpoint holds."""
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="The number of samples in each micro-batch.")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=128,
                        help="Micro-batches per weight update (under torchrun: in total, across all processes).")
    parser.add_argument("--learning_rate", type=float_in(0, LARGEST_FACTOR, low_excluded=True), default=learning_rate,
                        help="The peak step size, reached after --warmup_steps and decayed by a cosine to a tenth; "
                        "at most 1e30.")
    parser.add_argument("--warmup_steps", type=steps_or_percentage, default=warmup_steps,
                        help="Linear warmup: a number of optimizer steps, or a percentage of all steps like 5%%.")
    parser.add_argument("--num_epochs", type=positive_int, default=num_epochs,
                        help="The number of epochs to train for.")
    parser.add_argument("--eval_interval", type=positive_int, default=eval_interval,
                        help="Evaluate on the held-out split every this many epochs (and at the end).")
    parser.add_argument("--checkpoint_interval", type=positive_int, default=checkpoint_interval,
                        help="Save a checkpoint every this many epochs (and always at the end).")
    parser.add_argument("--checkpoint_path", type=non_empty_path, default=checkpoint_path,
                        help=f"The {what} checkpoint file; metrics go beside it as <name>.metrics.jsonl.")
    parser.add_argument("--log_dir", type=non_empty_path, default=None,
                        help="TensorBoard's folder, one run per checkpoint name (default: runs/ beside the "
                        "checkpoint).")
    parser.add_argument("--tensorboard", action=BooleanOptionalAction, default=True,
                        help="Write TensorBoard curves.")
    parser.add_argument("--resume", action=BooleanOptionalAction, default=False,
                        help="Resume training from the checkpoint at --checkpoint_path.")
    parser.add_argument("--max_gradient_norm", type=positive_float, default=1.0,
                        help="Clip gradients above this global norm before stepping.")
    parser.add_argument("--activation_checkpointing", action=BooleanOptionalAction, default=False,
                        help="Recompute each block's activations during the backward pass to save memory.")
    add_compile_argument(parser)
    add_precision_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--seed", type=seed, default=None,
                        help="The random seed (default: a random one, recorded).")


def run_config(args: argparse.Namespace, **run) -> RunConfig:
    """The RunConfig of add_training_arguments' flags; `run` gives what the script knows besides them (the steps and
    units of an epoch, its labels, the compute dtype...)."""
    return RunConfig(
        num_epochs=args.num_epochs, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        max_gradient_norm=args.max_gradient_norm, eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval, checkpoint_path=args.checkpoint_path, log_dir=args.log_dir,
        tensorboard=args.tensorboard, flags=vars(args), **run,
    )


def add_model_path_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model to run comes from (finetuning.load_inference_model reads it): every script that runs one."""
    parser.add_argument("--checkpoint_path", type=non_empty_path, default=None,
                        help="A checkpoint of pre-train.py or a folder of export.py (default: ./out/checkpoint.pt, "
                        "or the base an adapter names).")
    parser.add_argument("--lora_path", type=non_empty_path, default=None,
                        help="An adapter of instruction-tune.py or preference-tune.py, merged into its base; prompts "
                        "take its template.")


def add_inference_arguments(parser: argparse.ArgumentParser, max_tokens: int, prompt: bool = True) -> None:
    """The flags of the scripts that run a pre-trained model on prompts: generate.py, beam_search.py and chat.py
    (which takes no --prompt)."""
    add_model_path_arguments(parser)
    if prompt:
        parser.add_argument("--prompt", default=None,
                            help="The text to complete (default: each line typed, or of standard input).")
    parser.add_argument("--max_tokens", type=positive_int, default=max_tokens,
                        help="The most tokens to generate per prompt; <|endoftext|> ends a text earlier.")
    add_precision_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--seed", type=seed, default=None,
                        help="The random seed, for reproducible runs.")


def add_sampling_arguments(parser: argparse.ArgumentParser, penalty_flag: str) -> None:
    """The flags of sampling: generate.py's --repeat_penalty is chat.py's --repetition_penalty (transformers'
    name)."""
    parser.add_argument("--temperature", type=positive_float, default=1.0,
                        help="Divide the logits by this: below 1 sharpens the distribution, above 1 flattens it; "
                        "below 1e-4, always the most likely token (greedy).")
    parser.add_argument("--top_k", type=positive_int, default=500,
                        help="Only sample from this many candidate tokens with the highest probabilities.")
    parser.add_argument("--top_p", type=probability, default=0.9,
                        help="Of the top_k tokens, keep only the most likely ones whose probabilities add up to "
                        "top_p (the most likely one always stays).")
    parser.add_argument(penalty_flag, type=float_in(*REPEAT_PENALTIES), default=1.0,
                        help="Make the tokens already in the context less likely: their positive logits are "
                        "divided by this, negative ones multiplied (1 turns it off); from 1e-6 to 1e6.")


def check_dataset_path(args: argparse.Namespace) -> None:
    """--dataset_path goes with --dataset local, and only with it (a one-line ValueError otherwise)."""
    if args.dataset == "local" and not args.dataset_path:
        raise ValueError("--dataset_path: required with --dataset local (a .json or .jsonl file, a folder or a glob)")
    if args.dataset != "local" and args.dataset_path:
        raise ValueError(f"--dataset_path: only used with --dataset local, not with --dataset {args.dataset}")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of LoRA adapters (finetuning.lora_args reads them), the same in every fine-tuning script."""
    parser.add_argument("--rank", type=positive_int, default=8,
                        help="The rank of the LoRA decomposition matrices A and B.")
    parser.add_argument("--alpha", type=float_in(0, LARGEST_FACTOR, low_excluded=True), default=1.0,
                        help="The strength of the LoRA signal: each weight becomes W + alpha * B @ A; at most 1e30.")
    parser.add_argument("--dropout", type=fraction, default=0.05,
                        help="The proportion of signals to send to zero during training as regularization "
                        "(in the adapters' inputs and in the frozen model).")
