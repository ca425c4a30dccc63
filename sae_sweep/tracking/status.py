"""One vocabulary for the state of a run and of a grid point."""

import enum


class RunStatus(str, enum.Enum):
    """RUNNING, FINISHED, FAILED and KILLED are MLflow's own run statuses (the values its store keeps,
    so ``run.info.status == RunStatus.FINISHED`` compares as expected). SKIPPED and BUSY are what a grid
    point reports when it starts no run: its run key FINISHED before, or another process holds it now."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"
    SKIPPED = "SKIPPED"
    BUSY = "BUSY"

    def __str__(self) -> str:
        return self.value
