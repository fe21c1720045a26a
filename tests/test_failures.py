"""A dying role stops the whole job with a message naming it, and leaves no orphan."""

import os
import signal
import subprocess
import sys

import pytest

from helpers import events, pid_alive, wait_until

pytestmark = pytest.mark.integration


def start_cli(run_root, *extra):
    cmd = [sys.executable, "-m", "stalwart.cli", "train", "--quiet", "--workers", "3", "--servers", "2",
           "--samples", "4000", "--duration", "120", "--out", str(run_root), "--name", "run", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_pids(run_dir):
    return {(e["member_role"], e["member_index"]): e["pid"] for e in events(run_dir, "member_joined")
            if e.get("pid")}


def training(run_dir):
    return len(events(run_dir, "train")) >= 3 and len(job_pids(run_dir)) >= 6


def training_job(run_root):
    """A CLI job that is training, with the pid of each of its roles."""
    proc = start_cli(run_root)
    run_dir = run_root / "run"
    try:
        wait_until(lambda: (run_dir / "events").exists() and training(run_dir), 90, "training to start")
    except BaseException:
        proc.kill()
        raise
    return proc, run_dir, job_pids(run_dir)


def test_killed_worker_stops_the_job_cleanly(run_root):
    proc, run_dir, pids = training_job(run_root)
    try:
        os.kill(pids[("worker", 1)], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert f"worker 1 (pid {pids[('worker', 1)]}) was killed by SIGKILL" in stderr
    assert "stopping the job" in stderr
    assert not [key for key, pid in pids.items() if key[0] != "driver" and pid_alive(pid)]
    summary = (run_dir / "summary.json").read_text()
    assert '"status": "failed"' in summary


def test_ctrl_c_stops_everything(run_root):
    proc, run_dir, pids = training_job(run_root)
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the CLI dumps its threads' stacks to stderr
        try:
            _, stderr = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"the CLI did not exit within 60 s of SIGINT; its stacks:\n{stderr[-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in stderr
    assert not [key for key, pid in pids.items() if key[0] != "driver" and pid_alive(pid)]


def test_a_first_ctrl_c_is_a_request_and_a_second_one_interrupts_at_once():
    from stalwart.launch.job import DeferredInterrupt
    before = signal.getsignal(signal.SIGINT)
    with DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)   # handled in this thread before kill returns
        assert interrupt.requested             # noted, nothing raised mid-statement
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()                  # raised where the driver asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
