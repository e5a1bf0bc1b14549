import re

from conftest import REPOSITORY
from corpora import CORPORA, DEFAULT_CORPUS, corpus_table, dataset_help
from readme_flags import script_parser, with_current_tables
from training import tensorboard_writer

README = REPOSITORY / "README.md"


def test_the_argument_tables_are_what_the_parsers_define():
    readme = README.read_text()
    assert with_current_tables(readme) == readme, "run: python readme_flags.py"


def test_the_corpus_table_and_the_dataset_flag_come_from_the_registry():
    readme = README.read_text()
    assert f"| `{DEFAULT_CORPUS}` (default) |" in readme and corpus_table() in readme
    dataset = next(action for action in script_parser("pre-train.py")._actions if action.dest == "dataset")
    assert dataset.choices == tuple(CORPORA) and dataset.help == dataset_help()


def test_the_readme_stays_a_user_s_document_under_24_kb():
    assert len(README.read_bytes()) < 24_000


def test_the_readme_s_tensorboard_folder_is_where_training_writes_by_default(tmp_path, monkeypatch):
    command = re.search(r"^tensorboard --logdir (\S+)$", README.read_text(), re.M)
    assert command, "the README shows no tensorboard command"
    monkeypatch.chdir(tmp_path)
    for script in ("pre-train.py", "instruction-tune.py"):
        tensorboard_writer(script_parser(script).parse_args([]), start_step=0).close()
    assert sorted(run.name for run in (tmp_path / command.group(1)).iterdir()) == ["checkpoint", "lora_instruction"]
