import re

from conftest import REPOSITORY
from flags import run_config
from readme_flags import script_parser, with_current_tables
from training import tensorboard_writer

README = REPOSITORY / "README.md"


def test_the_argument_tables_are_what_the_parsers_define():
    readme = README.read_text()
    assert with_current_tables(readme) == readme, "run: python readme_flags.py"


def test_the_readme_stays_a_user_s_document_under_20_kb():
    assert len(README.read_bytes()) < 20_000


def test_the_readme_s_tensorboard_folder_is_where_training_writes_by_default(tmp_path, monkeypatch):
    command = re.search(r"^tensorboard --logdir (\S+)$", README.read_text(), re.M)
    assert command, "the README shows no tensorboard command"
    monkeypatch.chdir(tmp_path)
    for script in ("pre-train.py", "instruction-tune.py"):
        run = run_config(script_parser(script).parse_args([]), steps_per_epoch=1, unit="tokens", units_per_epoch=1,
                         description="", saved_what="", program=script)
        tensorboard_writer(run, start_step=0).close()
    assert sorted(run.name for run in (tmp_path / command.group(1)).iterdir()) == ["checkpoint", "lora_instruction"]
