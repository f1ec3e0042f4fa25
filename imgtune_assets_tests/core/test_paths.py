import os
import stat
import sys

from imgtune_assets.core import paths


def _interpreter(folder):
    folder.mkdir(parents=True)
    python = folder / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_the_command_names_the_interpreter_that_has_imgtune(tmp_path, monkeypatch):
    project = tmp_path / "project"
    python = _interpreter(project / ".venv" / "bin")
    other = _interpreter(tmp_path / "system" / "bin")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", str(other.parent))  # a bare `python` is another interpreter
    monkeypatch.chdir(project)
    assert paths.imgtune_command() == ".venv/bin/python -m imgtune_assets.cli"
    monkeypatch.chdir(tmp_path / "system")  # elsewhere: the whole path
    assert paths.imgtune_command() == f"{python} -m imgtune_assets.cli"
    monkeypatch.setenv("PATH", os.pathsep.join([str(python.parent), str(other.parent)]))  # an activated venv
    assert paths.imgtune_command() == "python -m imgtune_assets.cli"


def test_a_path_with_spaces_is_quoted(tmp_path, monkeypatch):
    python = _interpreter(tmp_path / "my venv" / "bin")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", "")
    monkeypatch.chdir(tmp_path)
    assert paths.imgtune_command() == "'my venv/bin/python' -m imgtune_assets.cli"


def test_in_the_interpreters_own_folder_or_a_deleted_one(tmp_path, monkeypatch):
    python = _interpreter(tmp_path / "venv" / "bin")
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setenv("PATH", "")
    monkeypatch.chdir(python.parent)
    assert paths.imgtune_command() == "./python -m imgtune_assets.cli"  # not a bare name looked up on PATH
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert paths.imgtune_command() == f"{python} -m imgtune_assets.cli"


def test_a_console_scripts_versioned_interpreter_is_named_as_the_venvs_python(tmp_path, monkeypatch):
    """`.venv/bin/dg` runs `.venv/bin/python3.11` (its shebang): the messages say `.venv/bin/python`, the
    same file, as the README does; a `python3.11` with no such twin keeps its own name."""
    python = _interpreter(tmp_path / ".venv" / "bin")
    versioned = python.with_name("python3.11")
    versioned.symlink_to(python.name)
    monkeypatch.setattr(sys, "executable", str(versioned))
    monkeypatch.setenv("PATH", "")
    monkeypatch.chdir(tmp_path)
    assert paths.imgtune_command() == ".venv/bin/python -m imgtune_assets.cli"
    lone = _interpreter(tmp_path / "other" / "bin").with_name("python3.11")
    lone.write_text("#!/bin/sh\n")  # beside a `python` that is another file
    monkeypatch.setattr(sys, "executable", str(lone))
    assert paths.imgtune_command() == "other/bin/python3.11 -m imgtune_assets.cli"


def test_a_sweep_command_carries_the_variables_that_chose_the_sweep_and_its_outputs():
    from imgtune_assets.core.paths import imgtune_command, sweep_command

    assert sweep_command("my sweep", "--resume", environ={}) == f"{imgtune_command()} sweep 'my sweep' --resume"
    env = {"IMGTUNE_SWEEPS_DIR": "/srv/team sweeps", "IMGTUNE_OUTPUT_DIR": "/data/out", "IMGTUNE_SWEEP": " "}
    assert sweep_command("a", environ=env) == f"IMGTUNE_SWEEPS_DIR='/srv/team sweeps' IMGTUNE_OUTPUT_DIR=/data/out " \
                                               f"{imgtune_command()} sweep a"
    # resumed on the cluster it ran on, not on an embedded Ray
    env["IMGTUNE_RAY_ADDRESS"] = "127.0.0.2:6379"
    assert sweep_command("a", environ=env).endswith(f"IMGTUNE_OUTPUT_DIR=/data/out IMGTUNE_RAY_ADDRESS=127.0.0.2:6379 "
                                                    f"{imgtune_command()} sweep a")
