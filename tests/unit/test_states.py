from __future__ import annotations

import pytest

from jobsvc.states import JobStatus, TransitionError, check_transition


@pytest.mark.parametrize("new", [JobStatus.STOPPED, JobStatus.FINISHED])
def test_running_may_end_either_way(new: JobStatus) -> None:
    check_transition(JobStatus.RUNNING, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (JobStatus.RUNNING, JobStatus.RUNNING),
        (JobStatus.STOPPED, JobStatus.RUNNING),
        (JobStatus.STOPPED, JobStatus.FINISHED),
        (JobStatus.FINISHED, JobStatus.RUNNING),
        (JobStatus.FINISHED, JobStatus.STOPPED),
        (JobStatus.FINISHED, JobStatus.FINISHED),
    ],
)
def test_ended_is_final(old: JobStatus, new: JobStatus) -> None:
    with pytest.raises(TransitionError):
        check_transition(old, new)


def test_ended_property() -> None:
    assert not JobStatus.RUNNING.ended
    assert JobStatus.STOPPED.ended and JobStatus.FINISHED.ended
