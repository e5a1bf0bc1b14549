import re
import subprocess
import sys

import pytest

from conftest import REPOSITORY, load_script

SCRIPTS = sorted(path.stem for path in REPOSITORY.glob("*.py") if "\ndef build_parser(" in path.read_text())


def help_entries(script: str) -> tuple[list[str], set[str]]:
    """The option entries of a script's --help, each on one line, and the options it lists."""
    text = load_script(script).build_parser().format_help()
    options = text[text.index("options:"):]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)[1:]]
    listed = {flag for entry in entries for flag in re.findall(r"^-[-\w]+|(?<=, )-[-\w]+", entry)}
    return entries, listed


def test_every_script_has_a_parser():
    assert {"pre-train", "instruction-tune", "generate", "beam_search", "export", "bench"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_help_line_gives_two_defaults_or_names_a_flag_that_help_does_not_list(script):
    entries, listed = help_entries(script)
    for entry in entries:
        assert entry.count("(default") <= 1, entry
        assert "(default: None)" not in entry, entry
        # its own flags, not another script's ("evaluate.py's --data_path")
        named = {flag.rstrip(".,;:)") for flag in re.findall(r"(?<!\.py's )--\[?[\w-]+\]?[\w-]*", entry)}
        assert named <= listed, f"{entry} names {named - listed}"


@pytest.mark.slow
def test_our_warnings_are_one_line_without_the_source_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    file = tmp_path / "latin1.txt"
    code = f"import flags, corpora; corpora.warn_about_undecodable_bytes(corpora.Path({str(file)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"-c: warning: --text_files: {tmp_path / 'latin1.txt'} has 2 byte "
                                          "sequence(s) that are not UTF-8; they are read as the replacement "
                                          "character U+FFFD"]


def test_every_path_flag_of_every_script_refuses_an_empty_path(capsys):
    """'' would be Path('.'), the current folder: a checkpoint "not found there", or a default taken silently."""
    refused = []
    for script in SCRIPTS:
        parser = load_script(script).build_parser()
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else ""
            if re.search(r"_(path|dir|files)$", flag):
                with pytest.raises(SystemExit):
                    parser.parse_args([flag, ""])
                assert f"argument {flag}: must name a file or folder, got an empty path" in capsys.readouterr().err
                refused.append(f"{script} {flag}")
    assert {"pre-train --log_dir", "export --checkpoint_path", "evaluate --include_path",
            "generate --lora_path", "preference-tune --base_model_path"} <= set(refused), refused
