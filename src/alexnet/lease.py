"""Leases: which job trains a run right now, kept in the tracking store itself, so that every machine of the
team sees it (a SQLite file or an MLflow server alike: only MLflow's client API).

A job that trains a run holds its lease: the run's tag ``alexnet.lease`` says who (host and pid), since when,
and when it last beat; a daemon thread beats every ``logger.lease_seconds``. Another job with the same
configuration leaves a run with a live lease alone (``Held``: the job is skipped, nothing is touched), and
takes over a run whose lease expired (``MISSED_BEATS`` beats missed: its machine died or lost the network)
or whose holder on this same machine is gone, or whose SLURM job was requeued as the job now asking
(``scontrol requeue``, a node failure: the new attempt need not wait out the beats). Expiry compares the
machines' clocks: keep them in sync (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Run

from alexnet.errors import TrackingError, require
from alexnet.identity import config_lock
from alexnet.redaction import mask_secrets

log = logging.getLogger(__name__)

LEASE_TAG = "alexnet.lease"
HOST_ENV = "ALEXNET_HOST"  # who this machine says it is; a test pretends to be another machine with it
MISSED_BEATS = 3  # a lease expires when this many heartbeats in a row are missing


class Held(Exception):
    """Another live job trains this configuration's run: this job skips it, and touches nothing."""


class LeaseLost(Held):
    """This job's lease was taken over (its heartbeats stopped reaching the store for too long): it stops
    without writing to the run again."""


def host() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def slurm_attempt() -> tuple[str, int] | None:
    """This process's SLURM job and how often SLURM has requeued it (None outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    return (job, int(os.environ.get("SLURM_RESTART_COUNT") or 0)) if job else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Holder:
    """A lease as a run's tag says it: who, since when, the last heartbeat, the holder's beat period."""

    host: str
    pid: int
    since: float
    beat: float
    seconds: float
    token: str
    slurm: list | None = None  # [job id, restart count] when SLURM ran the holder (JSON has no tuples)

    @classmethod
    def of(cls, run: Run) -> Holder | None:
        text = run.data.tags.get(LEASE_TAG)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError):  # not a lease this code wrote: nobody holds the run
            return None

    @property
    def expiry(self) -> float:
        return MISSED_BEATS * self.seconds

    def expired(self, now: float | None = None) -> bool:
        if self.host == host() and (self.pid == os.getpid() or not _alive(self.pid)):
            return True  # its process on this machine is gone: no need to wait for the beats
        mine = slurm_attempt()
        if self.slurm and mine and mine[0] == self.slurm[0] and mine[1] > self.slurm[1]:
            return True  # SLURM requeued the holder's job as this one, on any node: that attempt is gone
        return (time.time() if now is None else now) - self.beat > self.expiry

    def __str__(self) -> str:
        ago = max(0.0, time.time() - self.beat)
        return f"{self.host} pid {self.pid} since {_when(self.since)} (last heartbeat {ago:.0f} s ago)"


class Lease:
    """This job's lease on a run: written, renewed by a daemon thread every ``seconds``, released at the end.
    ``lost`` says who took it over, once a heartbeat finds another holder."""

    def __init__(self, uri: str, seconds: float, run_id: str | None = None):
        self.uri, self.seconds, self.run_id = uri, float(seconds), run_id
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def value(self) -> str:
        holder = {"host": host(), "pid": os.getpid(), "since": self.since, "beat": time.time(),
                  "seconds": self.seconds, "token": self.token, "slurm": slurm_attempt()}  # fmt: skip
        return json.dumps(holder)

    def claim(self, client: MlflowClient, previous: Holder | None) -> None:
        """Take the run over from an expired lease (or none). MLflow has no compare-and-set: two jobs that
        take over at once both write, the later write stays, and the other finds so after a settling pause
        and skips."""
        client.set_tag(self.run_id, LEASE_TAG, self.value())
        time.sleep(min(2.0, self.seconds / 4))
        holder = Holder.of(client.get_run(self.run_id))
        if holder is not None and holder.token != self.token:
            self.lost = str(holder)  # the lease is the other job's: release must not remove it
            raise Held(
                f"run {self.run_id} of this configuration was taken over at the same moment by {holder}; "
                "leaving it to that job."
            )
        if previous is not None:
            log.info("Took run %s over from %s: its lease had expired.", self.run_id, previous)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        client = MlflowClient(self.uri)  # its own client: the training thread uses the logger's
        while not self._stop.wait(self.seconds):
            try:
                holder = Holder.of(client.get_run(self.run_id))
                if holder is not None and holder.token != self.token:
                    self.lost = str(holder)
                    log.error("Lost the lease on run %s to %s: stopping this job.", self.run_id, holder)
                    return
                if not self._stop.is_set():
                    client.set_tag(self.run_id, LEASE_TAG, self.value())
            except Exception as err:  # noqa: BLE001 - a store that does not answer: beat again next time
                log.warning("Could not renew the lease on run %s: %s", self.run_id, mask_secrets(str(err)))

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLost(
                f"this job lost its lease on run {self.run_id} to {self.lost} (its heartbeats did not reach "
                f"the store for {MISSED_BEATS * self.seconds:.0f} s): stopped without writing to it again."
            )

    def release(self) -> None:
        """Stop beating and remove the lease, so that a rerun anywhere may take a failed run at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is not None or self.run_id is None:
            return
        try:
            MlflowClient(self.uri).delete_tag(self.run_id, LEASE_TAG)
        except Exception as err:  # noqa: BLE001 - it expires on its own
            log.warning("Could not release the lease on run %s: %s", self.run_id, mask_secrets(str(err)))


def seconds_of(logger: Any) -> float:
    """``logger.lease_seconds``, checked: the heartbeat period."""
    seconds = logger.get("lease_seconds", 60)
    ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0
    require(ok, "logger.lease_seconds", seconds, "a number of seconds > 0")
    return float(seconds)


def take_over(client: MlflowClient, previous: Run, held: Lease) -> None:
    """Make an interrupted or failed run this job's (RUNNING, one more attempt), unless another live job
    holds it: then ``Held``, and the run is left as it is."""
    run_id = previous.info.run_id
    holder = Holder.of(previous)
    if holder is not None and not holder.expired():
        raise Held(
            f"run {run_id} of this configuration is held by {holder}; another job takes it over once "
            f"{holder.expiry:.0f} s pass without a heartbeat."
        )
    held.run_id = run_id
    held.claim(client, holder)
    client.update_run(run_id, status="RUNNING")
    if "error" in previous.data.tags:  # the killed attempt's: a run that now finishes must not keep it
        client.delete_tag(run_id, "error")
    client.set_tag(run_id, "attempts", str(int(previous.data.tags.get("attempts", "1")) + 1))
    client.set_tag(run_id, "host", host())


def keep_first(client: MlflowClient, experiment: str, key: str, held: Lease) -> None:
    """Two machines that start a new configuration at the same moment both create a run: the older one
    (then the smaller id) is kept, the other is deleted at once and its job skipped."""
    rivals = client.search_runs([experiment], f"tags.run_key = '{key}'")
    first = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id))
    if first.info.run_id != held.run_id:
        held.lost = str(Holder.of(first) or "another job")  # nothing of ours to release
        client.delete_run(held.run_id)
        raise Held(
            f"run {first.info.run_id} of this configuration was created at the same moment by {held.lost}; "
            "leaving it to that job."
        )


def local_lock(checkpoint_dir: Path, key: str) -> FileLock:
    """The per-config file lock of this machine (alexnet.identity.config_lock), a skip when another process
    here holds it."""
    try:
        return config_lock(checkpoint_dir, key)
    except TrackingError as err:  # config_lock's only error: the lock is taken
        raise Held(str(err)) from None
