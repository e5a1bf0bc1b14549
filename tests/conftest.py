import atexit
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

# Tests never reach the network: the HuggingFace libraries fail fast instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# and keep their caches of the tests' little corpora out of the user's home.
HUGGINGFACE_CACHE = tempfile.mkdtemp(prefix="lightgpt-tests-hf-")
atexit.register(shutil.rmtree, HUGGINGFACE_CACHE, ignore_errors=True)
os.environ["HF_HOME"] = HUGGINGFACE_CACHE

# Only now: model.py imports huggingface_hub, which reads those variables once, on import.
from model import LightGPT, LightGPTConfig  # noqa: E402

# The flags of a tiny model over the real 50257-token vocabulary, for the scripts: fast enough for a CPU, real in
# every code path.
TINY_MODEL_FLAGS = [
    "--embedding_dimensions", "16", "--num_attention_heads", "2", "--num_hidden_layers", "1",
    "--block_size", "16", "--feed_forward_ratio", "2", "--device", "cpu",
]
# The LightGPTConfig of a small model for the tests that build one in-process: distinct predictions, milliseconds a
# step.
TINY_SHAPE = dict(vocabulary_size=97, embedding_dimensions=32, num_heads=4, num_layers=2, eos_index=0)


def lightgpt(**config) -> LightGPT:
    """A LightGPT of this configuration, its weights drawn from seed 0."""
    torch.manual_seed(0)
    return LightGPT(LightGPTConfig(**config))


def tiny_model(**overrides) -> LightGPT:
    return lightgpt(**(TINY_SHAPE | overrides))


def save_pretrained_checkpoint(model: LightGPT, path: Path, block_size: int) -> Path:
    """A hand-built checkpoint of the model, with the entries generate.py and instruction-tune.py read."""
    torch.save({"model_args": vars(model.config), "block_size": block_size, "tokenizer": "r50k_base",
                "model": model.state_dict(), "step": 0, "epoch": 0}, path)
    return path


def metrics(checkpoint_path: Path) -> list[dict]:
    """The records of the metrics log beside a checkpoint."""
    return [json.loads(line) for line in Path(checkpoint_path).with_suffix(".metrics.jsonl").read_text().splitlines()]


def tensorboard_run(folder: Path):
    """The TensorBoard events of a run folder, read as TensorBoard reads them (an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(folder))
    run.Reload()
    return run


# Scripts run one thread a process, so that separate processes round alike and can be compared bit for bit
# (see docs/testing.md).
def one_thread() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1"}


def load_script(name: str):
    """A script of the repository (its name without .py) as a module, to call its functions."""
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPOSITORY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script: str, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, and capture what it prints."""
    return subprocess.run(
        [sys.executable, str(REPOSITORY / script), *map(str, args)],
        cwd=kwargs.pop("cwd", REPOSITORY), env=kwargs.pop("env", None) or one_thread(), capture_output=True,
        text=True, timeout=timeout, **kwargs,
    )


def run_until_first_epoch_then_terminate(script: str, *args: str, metrics_path: Path,
                                          timeout: float = 120) -> subprocess.CompletedProcess:
    """Start a training script, send it SIGTERM once its first epoch is logged, and capture what it prints."""
    return terminate_after_first_epoch([sys.executable, REPOSITORY / script, *args], metrics_path, timeout)


def terminate_after_first_epoch(command: list, metrics_path: Path, timeout: float = 120,
                                env: dict | None = None) -> subprocess.CompletedProcess:
    """Start a training command, send it SIGTERM once its first epoch is logged, and capture what it prints."""
    command = [str(part) for part in command]
    process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env or one_thread())
    deadline = time.monotonic() + timeout
    while not metrics_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def limit_file_size(size: int) -> None:
    """From now on, in this process and those it starts, writing a file past `size` bytes fails (EFBIG), as
    writing to a full disk does (ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # which would otherwise kill the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture
def full_disk_after_4_kb():
    """Runs `function(*args)` in a child process whose files cannot grow past 4 kB, and returns its result or
    raises its exception here. The limit stays in the child: set here, it would also stop pytest writing its
    report to a file that is already larger."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                                initializer=limit_file_size, initargs=(4096,)) as child:
        yield lambda function, *args: child.submit(function, *args).result()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: non-zero exit, no traceback, and a last line that names what was wrong."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last_line, last_line


def flag_error(script, arguments: list[str], capsys) -> str:
    """The one line with which a script's parse_args (argparse, then exit) or validate_args (ValueError) refuses
    these flags."""
    try:
        args = script.parse_args(arguments)
        if hasattr(script, "validate_args"):
            script.validate_args(args)
    except SystemExit:
        return capsys.readouterr().err.strip().splitlines()[-1]
    except ValueError as error:
        assert "\n" not in str(error)
        return str(error)
    raise AssertionError(f"{arguments} were accepted")


@pytest.fixture(scope="session")
def dataset_path(tmp_path_factory) -> Path:
    """The embedded wikipedia corpus, prepared once for the whole session."""
    from preparation import prepare_corpus

    path = tmp_path_factory.mktemp("dataset")
    prepare_corpus("wikipedia", path, num_processes=2, show_progress=False)
    return path


# FineWeb-Edu's columns, in its order; LightGPT reads only 'text'.
FINEWEB_EDU_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score",
                       "int_score")


def fineweb_edu_mirror(root: Path, documents: list[str], num_files: int = 2, row_group_size: int = 100) -> Path:
    """A local folder laid out like HuggingFaceFW/fineweb-edu on the hub (its README's sample-10BT config and
    Parquet shards with its columns), which datasets.load_dataset reads, from a working directory of `root`, by the
    repository's name: the hub's streaming code path, run offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repository = root / "HuggingFaceFW" / "fineweb-edu"
    (repository / "sample" / "10BT").mkdir(parents=True)
    (repository / "README.md").write_text(
        "---\nlicense: odc-by\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
        "    path: sample/10BT/*\n---\n"
    )
    shard_size = -(-len(documents) // num_files)
    for shard, start in enumerate(range(0, len(documents), shard_size)):
        texts = documents[start : start + shard_size]
        rows = len(texts)
        table = pa.table({
            "text": texts, "id": [f"<urn:uuid:{start + row}>" for row in range(rows)],
            "dump": ["CC-MAIN-2024-10"] * rows, "url": [f"https://example.org/{start + row}" for row in range(rows)],
            "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/0/warc/0.warc.gz"] * rows,
            "language": ["en"] * rows, "language_score": [0.95] * rows,
            "token_count": [len(text.split()) for text in texts], "score": [3.2] * rows, "int_score": [3] * rows,
        })
        assert table.column_names == list(FINEWEB_EDU_COLUMNS)
        shard_path = repository / "sample" / "10BT" / f"{shard:03d}_00000.parquet"
        pq.write_table(table, shard_path, row_group_size=row_group_size)
    return root


# HellaSwag's columns on the hub (Rowan/hellaswag), in its order; the label is a string there, an int in the
# original JSON-lines files.
HELLASWAG_COLUMNS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type",
                     "label")
PEOPLE = ("A man", "A woman", "The chef", "A child", "The farmer", "A girl", "The teacher", "An old man")
ACTIVITIES = (
    ("is standing in a kitchen holding a knife.", "He", "slices the onions into thin rings on the board."),
    ("kneels beside a flat bicycle tyre.", "He", "pumps air into the tube until it is firm again."),
    ("walks into the garden with a watering can.", "She", "pours water over the roses along the fence."),
    ("sits at a piano in a quiet hall.", "She", "plays a slow waltz while the audience listens."),
    ("climbs onto the roof with a bag of tiles.", "He", "nails the new tiles over the leaking corner."),
    ("opens a box of paints at the easel.", "She", "paints a blue sky above the mountains."),
    ("carries a bucket of soapy water to the car.", "He", "scrubs the dirt off the doors with a sponge."),
    ("stands by the lake with a fishing rod.", "She", "casts the line far into the calm water."),
    ("ties an apron and lights the oven.", "He", "kneads the dough and shapes it into loaves."),
    ("rolls a yoga mat out on the floor.", "She", "stretches her arms up and bends slowly forward."),
    ("takes a ladder to the apple tree.", "He", "picks the ripe apples and drops them into a basket."),
    ("sits down with a pile of letters.", "She", "opens each envelope and reads the letters aloud."),
)
# Wrong endings: unlike a right one, none follows any context well.
DISTRACTORS = (
    "melts into the ceiling and sings to a spoon.", "folds the river twice and mails it to Tuesday.",
    "eats the ladder while the clouds count backwards.", "whispers to the gravel until it turns purple.",
    "swims through the carpet holding seven moons.", "unplugs the sunset and puts it in a drawer.",
    "knits a cloud from the smell of old pencils.", "balances the kitchen on one ear and sneezes.",
)


def made_up_hellaswag_items(count: int, seed: int = 0) -> list[dict]:
    """Made-up HellaSwag items in the original JSON-lines layout: each context's right ending is the one that
    belongs to its activity, the three wrong ones are nonsense (DISTRACTORS)."""
    import random

    generator = random.Random(seed)
    items = []
    for index in range(count):
        person = PEOPLE[index % len(PEOPLE)]
        activity = index % len(ACTIVITIES)
        ctx_a, ctx_b, right = ACTIVITIES[activity]
        wrong = generator.sample(DISTRACTORS, 3)
        label = generator.randrange(4)
        endings = wrong[:label] + [right] + wrong[label:]
        ctx_a = f"{person} {ctx_a}"
        items.append({"ind": index, "activity_label": "Chores", "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "label": label,
                      "endings": endings, "source_id": f"made-up-{index}"})
    return items


def write_hellaswag_jsonl(path: Path, items: list[dict]) -> Path:
    """The items as the original hellaswag_val.jsonl holds them: one JSON object a line, the label an int."""
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def hellaswag_mirror(root: Path, items: list[dict]) -> Path:
    """A local folder laid out like Rowan/hellaswag on the hub (its README's configs and a Parquet file of the
    validation split with its columns, the label as a string), which datasets.load_dataset reads, from a working
    directory of `root`, by the repository's name: the hub's streaming code path, run offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repository = root / "Rowan" / "hellaswag"
    (repository / "data").mkdir(parents=True)
    (repository / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: validation\n"
        "    path: data/validation-*\n---\n"
    )
    columns = {column: [item[column] for item in items] for column in HELLASWAG_COLUMNS}
    columns["label"] = [str(label) for label in columns["label"]]
    pq.write_table(pa.table(columns), repository / "data" / "validation-00000-of-00001.parquet")
    return root
