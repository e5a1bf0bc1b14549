"""Write the argument tables of docs/usage.md (which the README links to) from the scripts' own parsers, so the
two never drift apart.

python readme_flags.py rewrites every table between <!-- flags:SCRIPT --> and <!-- /flags --> in docs/usage.md and
README.md, and the corpus table (corpora.py's registry) between <!-- corpora --> and <!-- /corpora -->; with --check
it only says whether they are current (exit 1 if not).
"""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from corpora import corpus_table

REPOSITORY = Path(__file__).resolve().parent
DOCUMENTS = (REPOSITORY / "docs" / "usage.md", REPOSITORY / "README.md")
TABLE = re.compile(r"(<!-- flags:(?P<script>[\w.-]+) -->\n).*?(?=<!-- /flags -->)", re.S)
CORPUS_TABLE = re.compile(r"(<!-- corpora -->\n).*?(?=<!-- /corpora -->)", re.S)


def script_parser(script: str) -> argparse.ArgumentParser:
    """The parser a script builds in its build_parser()."""
    path = REPOSITORY / script
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def default_text(action: argparse.Action) -> str:
    if action.dest == "device":
        return "the best available"  # the machine's, not one value
    if isinstance(action.default, str):
        return f"`{action.default}`"
    return str(action.default)


def flags_table(parser: argparse.ArgumentParser) -> str:
    rows = ["| Argument | Default | Description |", "| --- | --- | --- |"]
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:  # a hidden alias that another flag explains
            continue
        expanded = action.help % vars(action)  # as argparse expands it: %% is %
        description = " ".join(expanded.split()).replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{action.option_strings[0]}` | {default_text(action)} | {description} |")
    return "\n".join(rows) + "\n\n"


def with_current_tables(document: str) -> str:
    document = CORPUS_TABLE.sub(lambda match: match[1] + "\n" + corpus_table() + "\n", document)
    return TABLE.sub(lambda match: match[1] + "\n" + flags_table(script_parser(match["script"])), document)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="Only check that the argument tables are current; exit 1 if they are not.")
    args = parser.parse_args()
    for document in DOCUMENTS:
        text = document.read_text()
        current = with_current_tables(text)
        if args.check and current != text:
            sys.exit(f"readme_flags.py: {document.relative_to(REPOSITORY)}'s argument tables differ from the parsers; "
                     f"run python readme_flags.py")
        if not args.check and current != text:
            document.write_text(current)


if __name__ == "__main__":
    main()
