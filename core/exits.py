"""Exit codes and stop signals of ./train.sh and ./test.sh, in one torch-free place the launcher imports.

Exit codes (documented in docs/troubleshooting.md):

====  ==================  ====================================================================
code  name                meaning
====  ==================  ====================================================================
0     EXIT_OK             training finished
1     EXIT_ERROR          unexpected error (a bug: the traceback is printed)
2     EXIT_USAGE          bad config, override, path, checkpoint or dataset (one-line message)
3     EXIT_NONFINITE      loss was nan/inf for more than ``train.max_nonfinite`` steps in a row,
                          or the validation loss was nan/inf (that epoch is not saved)
74    EXIT_IO             a checkpoint could not be written (disk full, permissions); EX_IOERR
75    EXIT_PREEMPTED      SIGTERM/SIGUSR1/SIGINT received: a checkpoint of the current step was saved;
                          run the same command again to resume (EX_TEMPFAIL: "try again")
76    EXIT_PEER_LOST      another process or data worker of the run died (killed, out of memory),
                          never joined, or made no progress for ``dist.watchdog_s`` (stopped, hung);
                          nothing was saved after the last checkpoint: run the same command to resume
====  ==================  ====================================================================
"""
import signal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_IO = 74
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76

# Cluster preemption and scancel (SIGTERM), SLURM's --signal (SIGUSR1), Ctrl-C (SIGINT): stop and keep the work.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StoppedBeforeStart(BaseException):
    """A stop signal before the trainer's guard took over.

    Not KeyboardInterrupt: CPython remembers a KeyboardInterrupt raised inside
    exec'd source (dataclasses, namedtuple, torch's imports build classes that
    way) and, run with ``-m``, kills itself with SIGINT at exit even though the
    exception was caught, so the run would end with -2 instead of 75."""


def stop_now(signum, frame):
    # the same stop arrives more than once (SLURM signals every process and the launcher forwards it):
    # the first one stops the run, the others are ignored until the process has exited
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise StoppedBeforeStart(signal.Signals(signum).name)
