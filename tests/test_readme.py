from conftest import REPOSITORY
from readme_flags import with_current_tables

README = REPOSITORY / "README.md"


def test_the_argument_tables_are_what_the_parsers_define():
    readme = README.read_text()
    assert with_current_tables(readme) == readme, "run: python readme_flags.py"


def test_the_readme_stays_a_user_s_document_under_20_kb():
    assert len(README.read_bytes()) < 20_000
