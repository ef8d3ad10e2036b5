"""How the processes of a study stop: signals, a dead driver, interrupted and stale trials, broken stores.

- Driver: the first Ctrl-C or SIGTERM raises `Interrupted` in its main thread; the executor then stops its
  workers, fails their unfinished trials with `fail_reason` = "interrupted" and queues each configuration
  again (user attribute `retry_of`); a second signal exits at once.
- Worker: SIGINT/SIGTERM interrupts the trial in progress the same way, or stops the worker before its next
  trial; one stuck in native code meanwhile records its trial from another thread (`WorkerSignals`). A worker
  whose driver dies, even by SIGKILL, gets SIGTERM (`exit_with_parent`) and so never trains on unseen. A Ray
  worker actor is no child of the driver: it watches the driver's pid, records its trial as interrupted and
  exits (`exit_with_driver`).
- A trial whose process died without a word (OOM killer, power cut) keeps its heartbeat only for the grace
  period; then Optuna's `fail_stale_trials` fails it and `RetryHeartbeatStaleTrialCallback` queues it again,
  at most `storage.max_retry` times. Fresh heartbeats belong to live workers (perhaps of another driver)
  and are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import io
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from common.errors import CellsearchError, Interrupted, StorageError, TrialsFailing
from search.study.experimental import experimental_features
from search.study.reseed import RESEED_ATTR
from search.execution.storage import first_line, open_storage, redact

FAIL_REASON = "fail_reason"
PUBLISHED_BY = "published_by"  # a trial trained under a deadline: the unix time its evaluation and publication end
INTERRUPTED = "interrupted"
RETRY_ATTR = "retry_of"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WORKER_GRACE_S = 6  # a stopping worker gets this long to record its trial, then it is killed
LAST_WORDS_S = 3  # the end of it, for recording from a thread when the main thread is stuck (WorkerSignals)
FAILURES_IN_A_ROW = 5
_PR_SET_PDEATHSIG = 1
_STORAGE_MODULES = ("sqlalchemy", "optuna.storages", "sqlite3", "psycopg2")


# ------------------------------------------------------------------------------------------- driver
@contextlib.contextmanager
def driver_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM raise `Interrupted` in the main thread once; a second one exits at once (the workers
    then die with their parent, see `exit_with_parent`). Yields the signals received so far."""
    received: list[int] = []

    def handle(signum: int, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            os._exit(128 + signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_command() -> str:
    """The command line that continues this study: the one that started it."""
    if Path(sys.argv[0]).name == "run.py" and Path(sys.argv[0]).parent.name == "search":
        return shlex.join(["python", "-m", "search.run", *sys.argv[1:]])
    return shlex.join(sys.argv)


def worker_id(pid: int | None = None) -> str:
    """How a trial names the process running it (user attribute `worker`): written by `run_trial`, matched
    here when a stopped worker's trials are failed, so the format lives in this one function."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def stop_processes(processes: Iterable, grace_s: float = WORKER_GRACE_S) -> None:
    """SIGTERM each live process, wait up to `grace_s` for all of them, then SIGKILL the rest."""
    processes = [p for p in processes if p.poll() is None]
    for process in processes:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except Exception:  # subprocess.TimeoutExpired: it had its chance
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------- worker side
class WorkerSignals:
    """SIGINT/SIGTERM in a worker: interrupt the trial in progress, or stop before the next one.

    Between trials (Optuna asking, telling, sampling) a signal only sets `requested`, so no storage write
    is cut in half; `interruptible()` marks the stretch where the signal raises `Interrupted` at once, or as
    soon as a storage write in progress (a trial's attribute, say) has finished. The first signal also arms a
    watchdog: a worker never outlives a stop request by more than WORKER_GRACE_S, and one that would writes
    where every thread of it was (its log) before it exits.
    """

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal, once one came
        self.last_words: Callable[[], int] = lambda: 0  # records a stuck worker's trials (`record_when_stuck`)
        self._raised = False
        self._interruptible = True

    def install(self) -> "WorkerSignals":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum
            self._end_within_grace(signum)
        elif self._raised:
            return
        if not self._interruptible:
            return
        if _in_storage_call(frame):  # cut mid-write, the connection could keep the database locked: retry soon
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        self._raised = True
        raise Interrupted(signum)

    def record_when_stuck(self, study: optuna.Study, storage_url: str) -> None:
        """Past its grace period, this process fails its RUNNING trials of `study` as interrupted, queued again."""
        self.last_words = lambda: fail_interrupted(study, storage_url, trials_of_workers(study, [os.getpid()]))

    def _end_within_grace(self, signum: int) -> None:
        """Outlive the stop request by WORKER_GRACE_S at most. A signal handler runs only between two Python
        steps of the main thread, so one stuck in native code (TensorFlow optimising a graph under load) cannot
        act on it: a thread then records the trials still running (`last_words`), says where each thread was,
        and exits; an interpreter-level timer ends the process should that not be done in time."""
        _exit_after(WORKER_GRACE_S)

        def overrun() -> None:
            time.sleep(WORKER_GRACE_S - LAST_WORDS_S)
            with contextlib.suppress(Exception):
                if self.last_words():
                    print(f"{signal.Signals(signum).name} did not stop the trial in {WORKER_GRACE_S - LAST_WORDS_S} s: "
                          "recorded as interrupted from another thread; where each thread was:", file=sys.stderr,
                          flush=True)
                    faulthandler.dump_traceback(file=sys.__stderr__)
            os._exit(128 + signum)

        threading.Thread(target=overrun, daemon=True, name="stop-overrun").start()

    @contextlib.contextmanager
    def interruptible(self, allowed: bool = True) -> Iterator[None]:
        before, self._interruptible = self._interruptible, allowed
        try:
            yield
        finally:
            self._interruptible = before

    def stop_callback(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna callback: no new trial after a stop request."""
        if self.requested:
            study.stop()

    def objective(self, objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
        """`objective`, interruptible; an interrupted trial is recorded and queued again before Optuna
        fails it (a finished trial takes no more attributes). Native code the signal cut into may turn the
        `Interrupted` it raised into another error (TensorFlow: a bare TypeError); once raised, any error is
        the interruption's."""

        def run(trial: optuna.Trial) -> float:
            try:
                if self.requested:  # the signal came while this trial was being created
                    raise Interrupted(self.requested)
                with self.interruptible():
                    return objective(trial)
            except KeyboardInterrupt:
                with self.interruptible(False):
                    requeue_interrupted(trial)
                raise
            except Exception as error:
                if not self._raised:
                    raise
                with self.interruptible(False):
                    requeue_interrupted(trial)
                raise Interrupted(self.requested) from error

        return run


def _exit_after(seconds: int) -> None:
    """End this process in `seconds`, from a thread of the interpreter's own that runs whatever Python does, after
    writing every thread's stack to stderr; without a stderr file, SIGALRM ends it silently."""
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(seconds)


def _in_storage_call(frame) -> bool:
    """Whether the interrupted code is inside a storage client (SQLAlchemy, an Optuna storage)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def exit_with_parent(parent_pid: int | None) -> None:
    """Get SIGTERM when the driver `parent_pid` dies, however it dies (Linux: PR_SET_PDEATHSIG; elsewhere a
    thread watching the parent pid)."""
    if parent_pid is None:
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        watch_process(lambda: os.getppid() == parent_pid, lambda: os.kill(os.getpid(), signal.SIGTERM))
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_with_driver(driver_pid: int, last_words: Callable[[], None] = lambda: None) -> None:
    """End this process within about a second of the driver's death, even when the driver is not its parent
    (a Ray trial actor, started by the raylet): `last_words()` (best effort), then `os._exit`."""

    def leave() -> None:
        with contextlib.suppress(Exception):
            last_words()
        os._exit(128 + signal.SIGTERM)

    watch_process(lambda: process_alive(driver_pid), leave)


def watch_process(alive: Callable[[], bool], then: Callable[[], None], every_s: float = 1.0) -> None:
    """From a daemon thread: check `alive()` every `every_s` seconds, and call `then()` once it is False."""

    def watch() -> None:
        while alive():
            time.sleep(every_s)
        then()

    threading.Thread(target=watch, daemon=True, name="driver-watch").start()


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (a zombie, killed but not yet reaped, does not)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):  # gone, or its stat read empty while it ended
            return False
    try:  # no /proc: the signal-0 probe, blind to zombies
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        pass
    return True


def descendants(pid: int) -> set[int]:
    """Every process below `pid` in the process tree (Linux /proc; empty elsewhere)."""
    found, todo = set(), [pid]
    while todo:
        tasks: list[Path] = []
        with contextlib.suppress(OSError):  # the process may end while it is listed
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
        for task in tasks:
            with contextlib.suppress(OSError):
                children = {int(c) for c in (task / "children").read_text().split()} - found
                todo.extend(children)
                found |= children
    return found


def reap_after(driver_pid: int, match: str, delay_s: float) -> None:
    """Watchdog loop: while `driver_pid` lives, note its descendants whose command line contains `match`; once
    it died (even by SIGKILL), give them `delay_s` seconds, then SIGKILL them and what they started."""
    noted: set[int] = set()
    while process_alive(driver_pid):
        for pid in descendants(driver_pid) - noted:
            with contextlib.suppress(Exception):  # a process that ends while it is read: skip it, never stop
                if match in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    noted.add(pid)
        time.sleep(0.5)
    time.sleep(delay_s)
    for pid in set(noted):  # with what they started since the last look (Ray restarting a worker, say)
        noted |= descendants(pid)
    for pid in noted - {os.getpid()}:  # its command line names `match` too
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def start_reaper(match: str, delay_s: float):
    """A watchdog process (`reap_after`) for this process's descendants matching `match`: processes that
    would outlive this one if it died unseen. Terminate it when they are stopped the ordinary way."""
    import subprocess

    code = f"from search.execution.lifecycle import reap_after; reap_after({os.getpid()}, {match!r}, {delay_s})"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ----------------------------------------------------------------------------------------- trials
def requeue_interrupted(trial: optuna.Trial) -> None:
    """Queue the RUNNING `trial`'s configuration again, then record that it was interrupted (so the mark means
    "queued"); its own process then fails it. Interrupted trials are not at fault: `storage.max_retry` does not
    limit this."""
    _queue_again(trial.study, _frozen(trial.study, trial.number))
    trial.set_user_attr(FAIL_REASON, INTERRUPTED)


def _frozen(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def fail_interrupted(study: optuna.Study, storage_url: str, trials: Iterable[FrozenTrial]) -> int:
    """Fail those of `trials` still RUNNING as interrupted, each queued again; returns how many.

    The state change comes first: of two processes failing the same trial only one wins, so only one
    queues it again. Trials are addressed through the public storage API (`storage_url`), by number."""
    trials = list(trials)
    if not trials:
        return 0
    storage, failed = open_storage(storage_url, heartbeat_interval=None, grace_period=None), 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in trials:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        current = storage.get_trial(trial_id)
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON, INTERRUPTED)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # its own process finished it meanwhile
            continue
        if current.user_attrs.get(FAIL_REASON) != INTERRUPTED:  # else requeue_interrupted queued it already
            _queue_again(study, current)
        failed += 1
    return failed


def _queue_again(study: optuna.Study, trial: FrozenTrial) -> None:
    params = trial.params or trial.system_attrs.get("fixed_params")  # not yet sampled: what was enqueued
    if params:
        kept = {k: trial.user_attrs[k] for k in (RESEED_ATTR,) if k in trial.user_attrs}
        study.enqueue_trial(params, user_attrs={**kept, RETRY_ATTR: trial.number})


def running_trials(study: optuna.Study, attr: str, values: Iterable) -> list[FrozenTrial]:
    """The RUNNING trials whose user attribute `attr` is one of `values` (the workers that run them)."""
    wanted = set(values)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t in running if t.user_attrs.get(attr) in wanted]


def trials_of_workers(study: optuna.Study, pids: Iterable[int]) -> list[FrozenTrial]:
    """The RUNNING trials these worker processes of this machine started."""
    return running_trials(study, "worker", (worker_id(pid) for pid in pids))


def interrupted_since(study: optuna.Study, started: float) -> int:
    """Trials interrupted since unix time `started`."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if t.user_attrs.get(FAIL_REASON) == INTERRUPTED and t.datetime_complete
               and t.datetime_complete.timestamp() >= started)


def recover_stale_trials(study: optuna.Study) -> None:
    """Optuna's stale-trial handling: RUNNING trials whose heartbeat is older than the grace period fail, and
    the storage's RetryHeartbeatStaleTrialCallback queues them again (no-op without heartbeats)."""
    with experimental_features():
        optuna.storages.fail_stale_trials(study)


# ----------------------------------------------------------------------------------- broken stores
def probe_artifact_store(store, location: str) -> None:
    """Write and remove a few bytes, or raise one StorageError naming the store."""
    probe = f"probe-{uuid.uuid4().hex}"
    try:
        store.write(probe, io.BytesIO(b"cellsearch"))
        store.remove(probe)
    except Exception as exc:  # OSError, botocore and google errors alike: the store is unusable
        raise StorageError(f"artifact store {location} is not writable ({first_line(exc)}): fix it or pass "
                           f"another --artifacts, then run the same command again") from None


@contextlib.contextmanager
def storage_failures(url: str) -> Iterator[None]:
    """Turn a storage that fails mid-study (database gone, disk full, locked out) into one StorageError."""
    try:
        yield
    except CellsearchError:
        raise
    except Exception as exc:  # sqlalchemy, Optuna's StorageInternalError (which wraps it), OSError
        if not _is_storage_error(exc):
            raise
        raise StorageError(f"storage {redact(url)} failed: {first_line(exc.__cause__ or exc)}") from None


def _is_storage_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError))


class FailureGuard:
    """Optuna callback of a worker: after a failed trial, stop the study with one line if the artifact
    store no longer takes files, or once FAILURES_IN_A_ROW trials in a row have failed."""

    def __init__(self, store, location: str) -> None:
        self.store, self.location, self.in_a_row = store, location, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            self.in_a_row = 0
            return
        reason = trial.user_attrs.get(FAIL_REASON, "no reason recorded")
        if reason == INTERRUPTED:
            return
        probe_artifact_store(self.store, self.location)
        self.in_a_row += 1
        if self.in_a_row >= FAILURES_IN_A_ROW:
            raise TrialsFailing(f"{self.in_a_row} trials in a row failed, the last with: {reason} "
                                f"(fix the cause, then run the same command again)")
