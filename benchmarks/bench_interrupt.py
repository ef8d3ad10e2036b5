"""How fast a stopped driver takes its workers with it, on this machine.

    python benchmarks/bench_interrupt.py                          # local executor, 2 workers
    python benchmarks/bench_interrupt.py --executor ray           # Ray on one node, 2 simulated GPUs
    python benchmarks/bench_interrupt.py --executor ray-2-nodes   # a cluster of two `ray start` nodes

Each scenario starts `python -m search.run` on a tiny study in its own session (as a terminal would), waits
until every worker trains a trial, then stops the driver the way a user does:

- `ctrl-c`: SIGINT to the whole process group (what Ctrl-C in a terminal sends);
- `ctrl-c-twice`: the same twice, 0.2 s apart (the impatient user: the driver exits at once);
- `sigterm`: SIGTERM to the driver only (`kill`, a batch scheduler);
- `sigkill`: SIGKILL to the driver only (`kill -9`, the OOM killer).

It prints, per scenario, the seconds from the signal to the last trial process gone (the processes the
trials recorded as their `worker`: local workers, Ray trial actors), to the last process the driver started
being gone (for Ray also its raylet and GCS), to the driver's exit, and what the storage then holds:
trials interrupted (FAIL, fail_reason "interrupted"), still RUNNING, and configurations queued again.

`ray-2-nodes` runs each scenario on a fresh cluster of this machine (a head node and a node joined with
`--address`, one CPU each, so the two trials run one per node; see tests/search_helpers.py), whose own
processes are not the driver's and stay up. It adds the scenario `node-loss`: every process of the second
node is SIGKILLed while both nodes train; it prints the trials per node and the seconds from the node's
death until its trial runs again on the head node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from search_helpers import RAY_ENV, descendants, ray_cluster, trial_pids, wait_for, write_tiny_spec  # noqa: E402

from search.execution.lifecycle import process_alive  # noqa: E402

# name: (signal, to the whole process group, how many times)
SCENARIOS = {"ctrl-c": (signal.SIGINT, True, 1), "ctrl-c-twice": (signal.SIGINT, True, 2),
             "sigterm": (signal.SIGTERM, False, 1), "sigkill": (signal.SIGKILL, False, 1)}


def start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot): tells a process from a later one given its pid."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return None


def identities(pids: set[int]) -> dict[int, str | None]:
    return {pid: start_time(pid) for pid in pids}


def alive(processes: dict[int, str | None]) -> set[int]:
    """Those of `processes` (pid -> start time) still running; a reused pid (pid_max may be 32768) is not."""
    return {pid for pid, started in processes.items() if process_alive(pid) and start_time(pid) == started}


def load_trials(url: str, name: str) -> list:
    with contextlib.suppress(Exception):
        return optuna.load_study(study_name=name, storage=url).trials
    return []


def start_study(executor: str, folder: Path, name: str, trials: int = 2, address: str | None = None,
                timeout: float = 600) -> tuple[subprocess.Popen, str, str]:
    """A driver in its own session (as a terminal starts one), once two of its trials train; returns it, the
    storage URL and the study name."""
    spec_path = write_tiny_spec(folder, name=name, trials=trials, min_epochs=3, max_epochs=3, train_images=1200)
    url = f"sqlite:///{folder / 'runs' / spec_path.stem / 'study.db'}"
    extra = {"local": ["--workers", "2"], "ray": ["--executor", "ray", "--gpus", "0,1"],
             "ray-2-nodes": ["--executor", "ray", "--address", str(address), "--workers", "2"]}[executor]
    driver = subprocess.Popen([sys.executable, "-m", "search.run", "--no-progress", "--study", str(spec_path),
                               *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=(folder / "driver.err").open("w"),
                              text=True, start_new_session=True, env={**os.environ, **RAY_ENV})
    try:
        wait_for(lambda: len([t for t in load_trials(url, name) if t.state == TrialState.RUNNING
                              and "worker" in t.user_attrs]) >= 2, timeout, f"{name}: two trials in training")
    except AssertionError:
        driver.kill()
        raise RuntimeError(f"{name}: no two trials trained within {timeout:.0f} s; driver's stderr ends: "
                           + (folder / "driver.err").read_text()[-2000:]) from None
    return driver, url, name


@contextlib.contextmanager
def nodes_for(executor: str, folder: Path):
    """The two-node cluster of `ray-2-nodes` (none for the other executors)."""
    if executor != "ray-2-nodes":
        yield None
        return
    with ray_cluster(folder, nodes=2, cpus=1) as nodes:
        yield nodes


def run_scenario(scenario: str, executor: str, folder: Path) -> dict:
    with nodes_for(executor, folder) as nodes:
        return stop_driver(scenario, executor, folder, nodes[0].address if nodes else None)


def stop_driver(scenario: str, executor: str, folder: Path, address: str | None) -> dict:
    signum, whole_group, times = SCENARIOS[scenario]
    driver, url, name = start_study(executor, folder, scenario.replace("-", "_"), address=address)
    spec_path = folder / f"{name}.toml"
    started = identities(descendants(driver.pid))
    trial_processes = identities(trial_pids(load_trials(url, spec_path.stem)))
    sent = time.monotonic()
    for repeat in range(times):
        time.sleep(0.2 * repeat)
        os.killpg(driver.pid, signum) if whole_group else driver.send_signal(signum)
    driver_gone = trials_gone = None
    while alive(started) or driver_gone is None:
        if driver_gone is None and driver.poll() is not None:
            driver_gone = time.monotonic() - sent
        if trials_gone is None and not alive(trial_processes):
            trials_gone = time.monotonic() - sent
        if time.monotonic() - sent > 120:
            break
        time.sleep(0.05)
    all_gone = time.monotonic() - sent
    last_line = (driver.stdout.read() if driver.poll() is not None else "").strip().splitlines()[-1:]
    driver.kill()
    trials = load_trials(url, spec_path.stem)
    return {
        "scenario": scenario, "executor": executor, "processes": len(started),
        "trials_gone_s": round(all_gone if trials_gone is None else trials_gone, 1),
        "all_gone_s": round(all_gone, 1), "driver_exit_s": round(driver_gone or all_gone, 1),
        "left_alive": len(alive(started)),
        "interrupted": sum(t.user_attrs.get("fail_reason") == "interrupted" for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "queued_again": sum(t.state == TrialState.WAITING for t in trials),
        "last_line": last_line[0] if last_line else "",
    }


def node_loss(folder: Path, trials: int = 4) -> str:
    """Kill every process of the second node while both nodes train; the trials per node and the seconds until
    the lost trial runs again (its retry trains on the head node)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with ray_cluster(folder, nodes=2, cpus=1) as (head, second):
        driver, url, name = start_study("ray-2-nodes", folder, "node_loss", trials=trials, address=head.address)
        lost = [t.number for t in load_trials(url, name) if t.state == TrialState.RUNNING
                and trial_pids([t]) <= second.pids()]
        killed = time.time()
        second.kill()
        rerun = wait_for(lambda: [t for t in load_trials(url, name) if "worker" in t.user_attrs
                                  and RetryHeartbeatStaleTrialCallback.retried_trial_number(t) in lost], 600,
                         "the lost trial running again")
        driver.wait(timeout=900)
    trials_now = load_trials(url, name)
    per_node = {}
    for trial in trials_now:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            node = trial.user_attrs["ray_node_ip"]
            per_node[node] = per_node.get(node, 0) + 1
    started = min(t.datetime_start.timestamp() for t in rerun)
    return (f"node-loss: trials lost with the node {lost}, running again after {started - killed:.1f} s "
            f"(grace period 6 s); finished trials per node {per_node}; driver exit code {driver.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=("local", "ray", "ray-2-nodes"), default="local")
    parser.add_argument("--scenarios", default=",".join([*SCENARIOS, "node-loss"]),
                        help="comma-separated, of " + ", ".join(SCENARIOS) + ", node-loss (ray-2-nodes only)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    columns = ("scenario", "executor", "processes", "trials_gone_s", "all_gone_s", "driver_exit_s", "left_alive",
               "interrupted", "running", "queued_again")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)
    for scenario in args.scenarios.split(","):
        if scenario == "node-loss":
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench_interrupt_{scenario}_") as folder:
            row = run_scenario(scenario, args.executor, Path(folder))
        print("| " + " | ".join(str(row[c]) for c in columns) + " |", flush=True)
        if row["last_line"]:
            print(f"  driver's last line: {row['last_line']}", flush=True)
    if args.executor == "ray-2-nodes" and "node-loss" in args.scenarios.split(","):
        with tempfile.TemporaryDirectory(prefix="bench_interrupt_node_loss_") as folder:
            print(node_loss(Path(folder)), flush=True)


if __name__ == "__main__":
    main()
