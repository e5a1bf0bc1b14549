"""Chat with a LightGPT tuned on conversations (instruction-tune.py --dataset chitchat, smol-smoltalk, ...), keeping
the key/value cache across turns."""

import argparse
import sys

import torch

from conversations import PromptTemplate, is_chat
from finetuning import load_inference_model
from devices import compute_dtype
from flags import ArgumentParser, add_inference_arguments, add_sampling_arguments
from generation import ChatSession, check_cache_memory
from tokenizer import stream_text

COMMANDS = """Commands:
  /reset        start a new conversation (the system message stays)
  /system TEXT  start a new conversation with this system message
  /help         show this
  /exit         leave (so does Ctrl-D); Ctrl-C stops a reply"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("Chat with a model tuned on conversations in ChatML: type a message, read the reply as "
                            "it is written. Piped input: each line is a message, each reply goes to standard "
                            "output followed by a blank line.")
    add_inference_arguments(parser, max_tokens=256, prompt=False)
    parser.add_argument("--system", default=None,
                        help="The system message that opens every conversation.")
    add_sampling_arguments(parser, "--repetition_penalty")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_chat_model(args: argparse.Namespace) -> tuple[torch.nn.Module, int, PromptTemplate]:
    """The model, its context length and its chat template, or a one-line ValueError for a model that cannot
    chat."""
    model, block_size, template = load_inference_model(args.checkpoint_path, args.device, args.lora_path,
                                                       compute_dtype(args.precision, torch.device(args.device)))
    if not is_chat(template):
        what = f"--lora_path {args.lora_path}" if args.lora_path else f"--checkpoint_path {args.checkpoint_path}"
        kind = f"was tuned with the {template.name} template" if template else "is not tuned on conversations"
        raise ValueError(f"{what} {kind}; chat.py needs a ChatML model: tune one with instruction-tune.py "
                         f"--dataset chitchat (see the README)")
    if args.top_k > model.vocabulary_size:
        raise ValueError(f"--top_k must be at most the vocabulary size {model.vocabulary_size}, got {args.top_k}")
    check_cache_memory(model, 1, block_size, f"a conversation of the model's {block_size:,}-token context",
                       "chat with a model of a shorter context")
    return model, block_size, template


def read_messages(interactive: bool):
    """The lines the user types (with line editing and history) or pipes in, until Ctrl-D or the end of input.
    At the terminal, Ctrl-C at the prompt only clears the line."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    import readline  # noqa: F401  (input() then edits lines and keeps a history)

    while True:
        try:
            yield input("You: ")
        except KeyboardInterrupt:
            print(file=sys.stderr)
        except EOFError:
            print(file=sys.stderr)
            return


def answer(session: ChatSession, text: str, args: argparse.Namespace, interactive: bool) -> None:
    """Stream the reply to stdout; Ctrl-C stops the reply and keeps what was said."""
    if interactive:
        print("Assistant: ", end="", flush=True)
    tokens = session.reply(text, args.max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    try:
        for piece in stream_text(tokens):
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        tokens.close()
        print(" [stopped]", end="")
    print("\n" if not interactive else "", flush=True)


def run_command(session: ChatSession, line: str) -> bool:
    """Carry out a /command; whether the chat goes on."""
    command, _, rest = line.partition(" ")
    if command == "/exit":
        return False
    if command == "/reset":
        session.reset(session.system)
        print("(a new conversation)", file=sys.stderr)
    elif command == "/system":
        try:
            session.reset(rest.strip() or None)
            print(f"(a new conversation, system message: {rest.strip() or 'none'})", file=sys.stderr)
        except ValueError as error:
            print(f"chat.py: /system: {error}; the conversation goes on", file=sys.stderr)
    elif command == "/help":
        print(COMMANDS, file=sys.stderr)
    else:
        print(f"unknown command {command!r}; /help lists them", file=sys.stderr)
    return True


def main() -> None:
    args = parse_args()
    try:
        model, block_size, template = load_chat_model(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"chat.py: error: {error}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        session = ChatSession(model, template, block_size, args.system, reply_room=args.max_tokens)
    except ValueError as error:
        sys.exit(f"chat.py: error: --system: {error}")
    interactive = sys.stdin.isatty()
    size = sum(parameter.numel() for parameter in model.parameters())
    print(f"Chatting with a {size:,}-parameter model ({block_size}-token context). "
          f"/help lists the commands; Ctrl-D leaves.", file=sys.stderr)
    try:
        for line in read_messages(interactive):
            if line.startswith("/"):
                if not run_command(session, line.strip()):
                    break
            elif line.strip():
                try:
                    answer(session, line, args, interactive)
                except ValueError as error:
                    print(f"chat.py: {error}", file=sys.stderr)
    except KeyboardInterrupt:  # piped input has no reply to stop: Ctrl-C leaves
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
