"""The `ptray` command as a user runs it: a subprocess with its own local Ray."""

import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from ptray.config import Config, builtin_config_names, reference_tables
import dataclasses

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _ptray(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ptray.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_pretrain_then_finetune_commands_with_relative_run_dir(tmp_path):
    # As in the README: the default run.dir (runs/tiny) is relative to where the user runs ptray; Ray's workers
    # run elsewhere, so every path must reach them absolute.
    proc = _ptray("pretrain", "--config", "tiny", "data.builtin_docs=2000", "pretrain.max_steps=10",
                  "pretrain.log_every=5", "pretrain.eval_every=10", "pretrain.ckpt_every=10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "step      5/10 | loss" in output and output.count("step     10/10 | loss") == 1  # one line, not echoed
    assert "Started training worker group" not in output  # Ray Train's own messages need --verbose
    assert f"export {tmp_path}/runs/tiny/export" in output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "runs/tiny/export").config.n_layer == 2
    proc = _ptray("finetune", "--config", "tiny", "data.builtin_docs=2000", "finetune.builtin_examples=200",
                  "finetune.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs/tiny/finetune-classification/export/model.safetensors").exists()
    # (`ptray sweep` as a subprocess:
    # test_finetune.py::test_interrupted_sweep_resumes_without_rerunning_finished_trials)


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
