"""LightGPT in EleutherAI's lm-evaluation-harness: its LM interface over evaluation.py's scoring and generation.py's
sampling. Importing this module imports lm-eval, an optional dependency (requirements-eval.txt)."""

from pathlib import Path

import tiktoken
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from evaluation import Row, continuation_row, score_rows, windows
from generation import generate
from model import LightGPT

DEFAULT_MAX_GENERATED_TOKENS = 256


class LightGPTLM(LM):
    """A LightGPT as the harness sees it: text in, log-likelihoods and text out.

    Args:
        block_size: the context the model sees; longer requests are cut from the left.
        batch_size: the sequences scored in one forward pass.
    """

    def __init__(self, model: LightGPT, tokenizer: tiktoken.Encoding, block_size: int, batch_size: int,
                 show_progress: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.block_size, self.batch_size = model, tokenizer, block_size, batch_size
        self.show_progress = show_progress

    def encode_context(self, text: str) -> list[int]:
        """The tokens of a context; <|endoftext|> for an empty one, so that the first token has one to follow."""
        return self.tokenizer.encode_ordinary(text) or [self.tokenizer.eot_token]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """The log-probability of each (context, continuation), and whether greedy decoding would produce it."""
        rows = [continuation_row(self.encode_context(context), self.tokenizer.encode_ordinary(continuation),
                                 self.block_size) for context, continuation in (request.args for request in requests)]
        return [(-score.loss, score.greedy) for score in self.scored(rows, "loglikelihood")]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """The log-probability of each whole text after <|endoftext|>, in disjoint windows of block_size tokens (the
        last one ending at the text's end with a full window of context)."""
        rows: list[Row] = []
        owners: list[int] = []
        for number, request in enumerate(requests):
            text_rows = windows([self.tokenizer.eot_token, *self.tokenizer.encode_ordinary(request.args[0])],
                                self.block_size, self.block_size)
            rows += text_rows
            owners += [number] * len(text_rows)
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, self.scored(rows, "loglikelihood_rolling")):
            totals[owner] -= score.loss
        return totals

    def scored(self, rows: list[Row], description: str):
        with tqdm(total=len(rows), desc=description, unit="sequence", disable=not self.show_progress, leave=False):
            return score_rows(self.model, rows, self.batch_size)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The text generated after each context until one of its stop strings (cut there), <|endoftext|> or
        max_gen_toks tokens: greedy unless the request asks to sample."""
        return [self.generate_one(context, options) for context, options in
                tqdm((request.args for request in requests), total=len(requests), desc="generate_until",
                     disable=not self.show_progress, leave=False)]

    def generate_one(self, context: str, options: dict) -> str:
        stops = options.get("until") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        sampling = options.get("do_sample", False)
        temperature = float(options.get("temperature", 1.0)) if sampling else 1.0
        top_k = self.model.vocabulary_size if sampling else 1  # one candidate: greedy
        prompt = torch.tensor(self.encode_context(context), device=self.model.token_embeddings.weight.device)
        tokens: list[int] = []
        text = ""
        for token in generate(self.model, prompt, int(options.get("max_gen_toks", DEFAULT_MAX_GENERATED_TOKENS)),
                              temperature=max(temperature, 1e-4), top_k=top_k, top_p=1.0, block_size=self.block_size):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, errors="replace")
            ends = [text.find(stop) for stop in stops if stop and stop in text]
            if ends:
                return text[: min(ends)]
        return text


def harness_task_manager(tasks: list[str], include_path: list[str] | None) -> TaskManager:
    """The tasks' manager: the task YAML files under include_path alone when they hold every task (indexing the
    harness's own thousands of tasks takes many seconds), else those and the harness's own. One-line errors for
    a path that is not there and for a task that neither knows."""
    for path in include_path or []:
        if not Path(path).exists():
            raise FileNotFoundError(f"--include_path {path}: no such file or folder")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    task_manager = TaskManager(include_path=include_path or None)
    unknown = [task for task in tasks if task not in set(task_manager.all_tasks)]
    if unknown:
        raise ValueError(f"--tasks: {unknown[0]!r} is neither hellaswag nor perplexity nor a task of lm-eval "
                         f"(lm-eval ls tasks lists them; --include_path adds your own)")
    return task_manager


def run_harness(lm: LightGPTLM, tasks: list[str], task_manager: TaskManager, limit: int | None) -> dict:
    """The harness's results dictionary (its own JSON) for these tasks, zero-shot."""
    return simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=False,
                           bootstrap_iters=1000)
