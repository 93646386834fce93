"""The setup hook Ray runs in each of its worker processes (ptray.session sets it): quiet Ray's known noise.

Only the standard library is imported here: every Ray Data task's and actor's process runs this before its first
task, and importing ray.train with it (as ptray.session does) cost each process 0.8 s.
"""

import logging
import sys
import warnings


def quiet_ray_process() -> None:
    """Run by Ray in each of its worker processes (without --verbose). Ray Train starts a watchdog actor per run
    that warns, on the console, each time it removes the placement group of a run whose controller ended, which
    is what happens to every sweep trial that Tune stops or finishes."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.train.v2._internal.execution.controller.controller").addFilter(drop_trial_stop_race)
    # Streamed data (data.ingest=ray_data): Ray Data's coordinator actor announces each execution and its plan, and
    # Ray Train sets an execution option that Ray Data calls deprecated.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    sys.unraisablehook = drop_exit_in_finalizer


def drop_exit_in_finalizer(unraisable) -> None:
    """sys.unraisablehook of Ray's worker processes. Ray stops a process (a sweep trial that Tune ends) with SIGTERM,
    whose handler raises SystemExit wherever the process is. Inside a finalizer (a weakref callback, a __del__)
    Python cannot raise it, and prints "Exception ignored in ..." with a traceback: that is the stop, not an error.
    Anything else goes to Python's own hook."""
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def drop_trial_stop_race(record: logging.LogRecord) -> bool:
    """A logging filter for Ray Train's controller. When Tune stops a sweep trial, Ray ends the trial's processes
    together; the trial's controller may still report once to the trial's result queue (an actor the trial owned,
    already gone because its owner died or its placement group was removed) and log the failure with a traceback.
    That is the stop, not an error: drop that one record."""
    message = record.getMessage()
    return not ("_QueueActor" in message and ("its owner has died" in message
                                              or "its placement group was removed" in message))
