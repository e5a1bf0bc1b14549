import re

from conftest import REPOSITORY
from corpora import CORPORA, DEFAULT_CORPUS, corpus_table, dataset_help
from flags import run_config
from readme_flags import DOCUMENTS, TABLE, script_parser, with_current_tables
from training import tensorboard_writer

README = REPOSITORY / "README.md"
USAGE = REPOSITORY / "docs" / "usage.md"


def test_the_argument_tables_are_what_the_parsers_define():
    for document in DOCUMENTS:
        text = document.read_text()
        assert with_current_tables(text) == text, f"{document.name}: run python readme_flags.py"


def test_the_corpus_table_and_the_dataset_flag_come_from_the_registry():
    readme = README.read_text()
    assert f"| `{DEFAULT_CORPUS}` (default) |" in readme and corpus_table() in readme
    dataset = next(action for action in script_parser("pre-train.py")._actions if action.dest == "dataset")
    assert dataset.choices == tuple(CORPORA) and dataset.help == dataset_help()


def test_docs_usage_has_every_user_script_s_table_and_the_readme_links_to_it():
    tables = [match["script"] for match in TABLE.finditer(USAGE.read_text())]
    assert tables == ["pre-train.py", "instruction-tune.py", "preference-tune.py", "generate.py", "beam_search.py",
                      "evaluate.py", "serve.py", "chat.py", "export.py"]
    assert "(docs/usage.md" in README.read_text()


def test_the_readme_stays_a_user_s_document_under_24_kb():
    assert len(README.read_bytes()) < 24_000


def test_the_readme_s_tensorboard_folder_is_where_training_writes_by_default(tmp_path, monkeypatch):
    command = re.search(r"^tensorboard --logdir (\S+)$", README.read_text(), re.M)
    assert command, "the README shows no tensorboard command"
    monkeypatch.chdir(tmp_path)
    for script in ("pre-train.py", "instruction-tune.py"):
        run = run_config(script_parser(script).parse_args([]), steps_per_epoch=1, unit="tokens", units_per_epoch=1,
                         description="", saved_what="", program=script)
        tensorboard_writer(run, start_step=0).close()
    assert sorted(run.name for run in (tmp_path / command.group(1)).iterdir()) == ["checkpoint", "lora_instruction"]
