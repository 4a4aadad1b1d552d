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
    assert sorted(os.listdir(work.root / PRIVATE)) == ["job1.tmp", "job1.var-tmp"]  # no per-job parent
    assert work.clear_private("job1")
    assert os.listdir(work.root / PRIVATE) == []
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
        assert os.path.lexists(var_tmp if leave == "file" else tmp)  # what holds something stays for remove_private
        work.remove_private(job)
        assert not os.path.lexists(tmp) and not os.path.lexists(var_tmp)
    assert os.listdir(work.root / PRIVATE) == []
    assert (outside / "keep").read_text() == "not the job's"


def test_private_dirs_of_the_former_layout_are_removed_too(tmp_path: Path) -> None:
    """A job a jobsvc before this one started has <id>/tmp and <id>/var-tmp: a restart's takeover removes them."""
    work = _root(tmp_path)
    old = work.root / PRIVATE / "old"
    (old / "tmp" / "deep").mkdir(parents=True)
    (old / "var-tmp").mkdir()
    (old / "tmp" / "deep" / "f").write_text("x")
    work.remove_private("old")
    assert os.listdir(work.root / PRIVATE) == []
