"""WorkRoot's private /tmp and /var/tmp, on a real (temporary) filesystem."""

from __future__ import annotations

import os
from pathlib import Path

from jobsvc.workroot import PRIVATE, WorkRoot


def _root(tmp_path: Path) -> WorkRoot:
    work = WorkRoot(tmp_path / "work")
    work.prepare()
    return work


def test_private_dirs_a_job_left_empty_are_cleared_in_place(tmp_path: Path) -> None:
    work = _root(tmp_path)
    tmp, var_tmp = work.make_private("job1")
    assert all(os.stat(d).st_mode & 0o7777 == 0o1777 for d in (tmp, var_tmp))
    assert work.clear_private("job1")
    assert not (work.root / PRIVATE / "job1").exists()
    assert work.clear_private("job1")  # already gone: nothing to do


def test_private_dirs_with_anything_left_are_for_the_thorough_removal(tmp_path: Path) -> None:
    work = _root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the job's")
    for job, leave in (("files", "file"), ("nested", "dir"), ("link", "symlink")):
        tmp, var_tmp = work.make_private(job)
        if leave == "file":
            Path(var_tmp, "left").write_text("x")
        elif leave == "dir":
            Path(tmp, "a", "b").mkdir(parents=True)
        else:  # the job's /tmp replaced by a symlink: never followed
            os.rmdir(tmp)
            os.symlink(outside, tmp)
        assert not work.clear_private(job)
        assert (work.root / PRIVATE / job).exists()
        work.remove_private(job)
        assert not (work.root / PRIVATE / job).exists()
    assert (outside / "keep").read_text() == "not the job's"
