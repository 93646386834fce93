"""The `ptray` command's documentation and the code's form (no Ray here; runs: test_cli_runs.py)."""

import os

from ptray.config import Config, builtin_config_names, reference_tables
import dataclasses

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_documents_every_config_key_and_builtin_config():
    readme = open(README).read()
    # The reference is generated (`ptray config docs`): a changed default or docstring must reach the README.
    assert reference_tables() in readme, "README's configuration reference is stale: paste `ptray config docs` into it"
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            assert f"`{section.name}.{f.name}`" in readme, f"{section.name}.{f.name} missing from README"
    for name in builtin_config_names():
        assert f"`{name}`" in readme


def test_no_code_line_is_longer_than_120_characters():
    root = os.path.dirname(README)
    long_lines = []
    for folder in ("ptray", "tests", "bench", "jobs", "cluster", ".ci"):
        for path, _, names in os.walk(os.path.join(root, folder)):
            for name in names:
                if name.endswith((".py", ".yaml", ".sh")) or name == "run":
                    for number, line in enumerate(open(os.path.join(path, name)), 1):
                        if len(line.rstrip("\n")) > 120:
                            long_lines.append(f"{os.path.join(path, name)}:{number}")
    assert not long_lines, long_lines
