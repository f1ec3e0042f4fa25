"""The sweep command's pure helpers (the command itself runs in test_cli_end_to_end.py and
test_cli_apply.py, through a real Dagster instance and Ray)."""

import shlex

from imgtune_assets.cli import resume_hint
from imgtune_assets.core.paths import imgtune_command


def test_the_resume_hint_carries_the_variables_that_chose_the_sweep_files():
    plain = resume_hint("slow", environ={})
    assert plain == f"finished trials are kept: `{imgtune_command()} sweep slow --resume` resumes"
    pinned = resume_hint("slow", environ={"IMGTUNE_SWEEP": "/data/my sweeps/slow.yaml", "IMGTUNE_SWEEPS_DIR": " "})
    assert pinned.startswith("finished trials are kept: `IMGTUNE_SWEEP='/data/my sweeps/slow.yaml' ")
    command = pinned.split("`")[1]
    assert shlex.split(command)[0] == "IMGTUNE_SWEEP=/data/my sweeps/slow.yaml"  # a shell reads it back whole
    assert "IMGTUNE_SWEEPS_DIR" not in pinned  # blank: not what chose the sweep
    folder = resume_hint("slow", environ={"IMGTUNE_SWEEPS_DIR": "/srv/sweeps"})
    assert "`IMGTUNE_SWEEPS_DIR=/srv/sweeps " in folder


def test_the_resume_hint_carries_where_the_trials_are_saved():
    # Run as printed in a shell without it, the sweep would write to outputs/ and compute every trial again.
    hint = resume_hint("slow", environ={"IMGTUNE_SWEEPS_DIR": "/srv/sweeps", "IMGTUNE_OUTPUT_DIR": "/data/out"})
    assert "`IMGTUNE_SWEEPS_DIR=/srv/sweeps IMGTUNE_OUTPUT_DIR=/data/out " in hint


def test_two_commands_of_one_sweep_in_the_same_second_get_their_own_logs(tmp_path):
    from imgtune_assets.cli import claim_log_file, log_file_path

    path = log_file_path(tmp_path, "denoise-demo")
    first, second, third = (claim_log_file(path) for _ in range(3))
    assert first == path and second == path.with_name(f"{path.stem}-2.log") and third.name.endswith("-3.log")
    assert all(p.is_file() and p.stat().st_size == 0 for p in (first, second, third))
