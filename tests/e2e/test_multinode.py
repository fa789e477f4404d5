"""Jobs on a Ray cluster of several nodes, as under `ray job submit`: one machine runs a head node (no CPUs, so
nothing of a job's work lands there) and two one-CPU worker nodes (`ray.cluster_utils.Cluster`); every job is a
subprocess joined to it through RAY_ADDRESS. A worker node killed without grace mid-run costs a 2-worker training
job one restart from its last checkpoint (every step still logged once); an elastic job (train.num_workers=[1,2])
finishes on the one node left; a sharded generation killed with SIGKILL and rerun writes every seed once. The node
killed is the worst one to lose: the one whose object store holds the only copy of objects (the training data's
blocks, when a worker node holds them), else a given rank's node.

Where each worker ran is read from Ray's own actor table (the GCS's record of every actor: pid, node, start time),
matched to the worker pids that Ray Train's controller prints for each worker group it starts.

The test process never connects to this cluster (the session's own cluster, `ray_cluster`, may be connected);
its address file and sockets live in a private temporary directory, so other Ray users of the machine never see
it as "the current cluster"."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Ray Train V2 knobs (ray/train/v2/_internal/constants.py), read by the Train controller actor and propagated
# to it from the driver's environment: how long a worker group waits for its placement group before the controller
# retries, with what the cluster then has (default 60 s; an elastic run waits this once for the lost node), and how
# often the controller polls the workers (default 2 s). Every `ray.train.report` blocks until the previous one was
# polled, so with a report per step the default poll alone costs 2 s per step.
TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# The GCS declares a node dead after `health_check_failure_threshold` failed checks `health_check_period_ms` apart
# (defaults 5 x 3 s): 3 x 1 s, so that a killed node leaves the resource view in seconds. A check still has the
# default 10 s to answer, so a slow but live node under load is not declared dead.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

STEPS = 16
TRAIN = [
    "--preset", "smoke", f"train.steps={STEPS}", "train.ckpt_every=4", "train.log_every=1", "train.batch_size=32",
    "train.sample_every=1000", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "optim.warmup_steps=2",
    "train.cpus_per_worker=1", "train.max_failures=2", "eval.enabled=false", "log.wandb=false",
    "log.tensorboard=false", "log.progress=false",
]
SEEDS = 40
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[multinode {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalCluster:
    """A head node with 0 CPUs and one-CPU worker nodes, started (and stopped) by this process without joining it."""

    def __init__(self):
        # short: the nodes' unix sockets live under it (a socket path is at most 107 bytes)
        self.tmp = tempfile.mkdtemp(prefix="rgmn-", dir="/tmp")
        # RAY_TMPDIR moves the "current cluster" address file too: Cluster writes it and a plain ray.init() (another
        # test session, a job without RAY_ADDRESS) would join this cluster. TRAIN_ENV is in the nodes' environment
        # as well, so the controller process a raylet starts sees it even without the driver's propagation.
        self._env = {"RAY_TMPDIR": self.tmp, **TRAIN_ENV}
        self.jobs: list[Job] = []  # ended at shutdown if still running (a test that failed mid-job)
        with environ(self._env):
            from ray.cluster_utils import Cluster

            self.cluster = Cluster(initialize_head=True, connect=False,
                                   head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                   "_system_config": HEAD_SYSTEM_CONFIG})
            for _ in range(2):
                self.cluster.add_node(num_cpus=1)
        assert Path(self.tmp, "ray", "ray_current_cluster").read_text().strip() == self.address

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def worker_nodes(self) -> dict:
        """node id (hex) -> Node"""
        return {n.node_id: n for n in self.cluster.worker_nodes}

    def add_worker(self):
        with environ(self._env):
            return self.cluster.add_node(num_cpus=1)

    def kill(self, node_id: str) -> None:
        """All of the node's processes killed at once (SIGKILL, no grace): a machine lost."""
        with environ(self._env):
            self.cluster.remove_node(self.worker_nodes[node_id], allow_graceful=False)

    def actors(self, class_name: str, since: float) -> dict[int, dict]:
        """pid -> GCS actor record of every `class_name` actor started since the wall time `since`."""
        return {a["Pid"]: a for a in self.cluster.global_state.actor_table(None).values()
                if a["ActorClassName"] == class_name and a["StartTime"] >= since * 1000 - 1}

    def job_env(self) -> dict:
        return {**os.environ, **self._env, "WANDB_MODE": "offline", "RAY_ADDRESS": self.address}

    def shutdown(self):
        for job in self.jobs:
            job.kill()
        with environ(self._env):
            self.cluster.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    t = time.monotonic()
    c = LocalCluster()
    say(f"cluster up in {time.monotonic() - t:.1f} s: head (0 CPUs) + 2 worker nodes of 1 CPU at {c.address}")
    yield c
    c.shutdown()


class Job:
    """`python jobs/<name>.py ...` in its own process group, joined to the cluster; stdout and stderr in files
    (read while it runs)."""

    def __init__(self, cluster: LocalCluster, name: str, args: list, logs: Path):
        self.name, self.started = name, time.time()
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / f"{name}.{self.started:.3f}.out", logs / f"{name}.{self.started:.3f}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *map(str, args)],
                                         stdout=out, stderr=err, env=cluster.job_env(), start_new_session=True)
        cluster.jobs.append(self)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- stdout ---\n{self.stdout[-n:]}\n--- stderr ---\n{self.stderr[-n:]}"

    def wait_for(self, cond, what: str, timeout: float = 300):
        """Poll `cond()` until it is truthy; fails if the job ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} ended (exit {self.proc.returncode}) before {what}\n{self.tail()}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}")

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout:.0f} s\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL to the job's whole process group (a no-op once it has ended)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# ---------------------------------------------------------------------------------------------- reading the run

GROUP_STARTED = re.compile(r"Started training worker group of size (\d+)")
GROUP_WORKER = re.compile(r"\(ip=[^,()]+, pid=(\d+)\) world_rank=(\d+)")


def worker_groups(stderr: str) -> list[dict[int, int]]:
    """Every worker group Ray Train's controller started, in order, as {world rank: pid} (complete groups only)."""
    groups, sizes = [], []
    for line in stderr.splitlines():
        if m := GROUP_STARTED.search(line):
            groups.append({})
            sizes.append(int(m[1]))
        elif (m := GROUP_WORKER.search(line)) and groups:
            groups[-1][int(m[2])] = int(m[1])
    return [g for g, n in zip(groups, sizes) if len(g) == n]


def group_nodes(cluster: LocalCluster, job: Job, group: dict[int, int]) -> dict[int, str]:
    """{world rank: node id} of a worker group, from the GCS actor table."""
    workers = cluster.actors("RayTrainWorker", job.started)
    missing = [pid for pid in group.values() if pid not in workers]
    assert not missing, f"worker pids {missing} are not RayTrainWorker actors of this job in the GCS"
    return {rank: workers[pid]["Address"]["NodeID"] for rank, pid in group.items()}


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train registered (0 while none is)."""
    try:
        snap = json.loads((run_dir / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return ((snap.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0)


def newest_run_dir(root: Path) -> Path | None:
    runs = sorted(root.glob("dit/*/"))
    return runs[-1] if runs else None


def primary_bytes(node) -> int:
    """Bytes of objects whose primary copy is in the node's object store, as its raylet reports them (the raylet's
    GetNodeStats over gRPC, ray._private.internal_api: no driver connection needed)."""
    from ray._private.internal_api import node_stats

    reply = node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False)
    return reply.store_stats.object_store_bytes_primary_copy


def train_with_node_loss(cluster: LocalCluster, tmp: Path, workers: str, fallback_rank: int, replace: bool) -> dict:
    """A 2-worker training job loses a worker node (SIGKILL, no grace) right after its first checkpoint is
    registered; a replacement node is added when `replace`. The node killed is the worst case: the one whose object
    store holds primary copies (the training data's blocks, whose only copy dies with it), else the node of rank
    `fallback_rank`. Returns what the tests check."""
    root = tmp / "runs"
    t = time.monotonic()
    job = Job(cluster, "dit", [*TRAIN, f"train.num_workers={workers}", "--runs-root", root], tmp / "logs")
    run_dir = job.wait_for(lambda: newest_run_dir(root), "the run directory")
    job.wait_for(lambda: registered_step(run_dir) > 0, "a registered checkpoint")
    first = job.wait_for(lambda: worker_groups(job.stderr), "the worker group's placement")[0]
    nodes = group_nodes(cluster, job, first)
    controllers = [a["Address"]["NodeID"] for a in cluster.actors("TrainController", job.started).values()]
    held = {n: primary_bytes(cluster.worker_nodes[n]) for n in set(nodes.values())}
    killed = max(held, key=lambda n: (held[n], n == nodes[fallback_rank]))
    ckpt_step, steps_at_kill, t_kill = registered_step(run_dir), logged_steps(run_dir), time.time()
    cluster.kill(killed)
    rank = ", ".join(str(r) for r, n in nodes.items() if n == killed)
    say(f"{workers} workers: killed rank {rank}'s node ({held[killed]} bytes of primary copies there, "
        f"{sum(held.values()) - held[killed]} on the other) after the step-{ckpt_step} checkpoint (step "
        f"{steps_at_kill[-1] if steps_at_kill else 0} logged), {time.monotonic() - t:.1f} s into the job")
    added = cluster.add_worker().node_id if replace else None
    # training must go on past the kill: a restarted group that never gets a batch hangs the job for good
    last_logged = steps_at_kill[-1] if steps_at_kill else 0
    deadline = time.monotonic() + 180
    while job.proc.poll() is None and max(logged_steps(run_dir), default=0) <= last_logged:
        if time.monotonic() > deadline:
            job.kill()
            lost = "Attempting to recover" in job.stdout + job.stderr
            raise AssertionError(
                f"no step after the node loss in 180 s: the restarted worker group hangs"
                + (" waiting for objects lost with the node (their owner tried to recover them by re-running the "
                   "tasks that made them, which need a CPU the new worker group holds)" if lost else "")
                + f"\n{job.tail()}")
        time.sleep(0.1)
    rc = job.finish(timeout=400)
    say(f"{workers} workers: job ended (exit {rc}) after {time.monotonic() - t:.1f} s")
    groups = worker_groups(job.stderr)
    return {"job": job, "rc": rc, "run_dir": run_dir, "first_nodes": nodes, "killed": killed, "added": added,
            "controllers": controllers, "ckpt_step": ckpt_step, "steps_at_kill": steps_at_kill, "t_kill": t_kill,
            "groups": groups, "last_nodes": group_nodes(cluster, job, groups[-1]) if groups else {},
            "worker_nodes_before": set(nodes.values()), "head": cluster.cluster.head_node.node_id}


def check_training(run: dict) -> None:
    """Common to both node-loss runs: finished, placed on two nodes, every step logged once, resumed (not
    restarted from scratch), the final checkpoint and export at the last step."""
    import torch

    from raygen.train.checkpoint import EXPORT_FILE, latest_checkpoint, read_record

    job, run_dir = run["job"], run["run_dir"]
    assert run["rc"] == 0, job.tail()
    lines = job.stdout.strip().splitlines()
    after = lines[lines.index(f"run_dir: {run_dir}") + 1:] if f"run_dir: {run_dir}" in lines else lines[-5:]
    assert not after, f"the job's last line must be 'run_dir: <path>'; after it came:\n" + "\n".join(after[:8])
    # the first group: one worker on each worker node (never the CPU-less head); the controller on the head, with
    # the driver (Ray Train places it on the driver's node), so a lost worker node never takes it along
    assert len(run["first_nodes"]) == 2 and len(set(run["first_nodes"].values())) == 2, run["first_nodes"]
    assert run["controllers"] == [run["head"]], run["controllers"]
    # the kill landed mid-run, after a checkpoint
    assert 0 < run["ckpt_step"] < STEPS and len(run["steps_at_kill"]) < STEPS, (run["ckpt_step"], run["steps_at_kill"])
    # the lost node failed the group: one failure, counted against train.max_failures=2, and a restart
    err = job.stderr
    assert "[FailurePolicy] RETRY" in err and "Source: worker group" in err, job.tail()
    assert "Error count: 1 (max allowed: 2)" in err and "Error count: 2 (max allowed: 2)" not in err, job.tail()
    assert "[FailurePolicy] RAISE" not in err
    assert len(run["groups"]) >= 2, job.tail()
    assert logged_steps(run_dir) == list(range(1, STEPS + 1)), "each step must be logged exactly once, in order"
    # the steps up to the checkpoint were not trained again (their records predate the kill): a resume
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all(r["time"] < run["t_kill"] for r in records[:run["ckpt_step"]]), "steps before the checkpoint re-run"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and read_record(ckpt)["step"] == STEPS
    assert (run_dir / EXPORT_FILE).is_file()
    assert torch.load(run_dir / EXPORT_FILE, map_location="cpu", weights_only=False)["step"] == STEPS


@pytest.fixture(scope="module")
def node_loss_run(cluster, tmp_path_factory):
    """The fixed-size run, a replacement node added after the kill (when no node holds data, rank 0's node is
    killed: the one writing metrics.jsonl and the checkpoint payload). Module-scoped: the sharded generation
    samples its weights."""
    return train_with_node_loss(cluster, tmp_path_factory.mktemp("nodeloss"), "2", fallback_rank=0, replace=True)


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_worker_node_lost_mid_run_restarts_from_the_checkpoint_on_a_replacement_node(node_loss_run):
    run = node_loss_run
    check_training(run)
    # the group that finished: two workers, on the surviving node and the replacement
    survivor = (run["worker_nodes_before"] - {run["killed"]}).pop()
    assert set(run["last_nodes"].values()) == {survivor, run["added"]}, run["last_nodes"]


def pngs(out: Path) -> dict[int, Path]:
    return {int(f.stem): f for f in sorted(out.glob("[0-9]*/[0-9]*.png"))}


@pytest.mark.slow
def test_sharded_generation_over_two_nodes_killed_and_rerun_writes_every_seed_once(cluster, node_loss_run,
                                                                                     tmp_path):
    from raygen.train.checkpoint import latest_checkpoint

    run_dir = node_loss_run["run_dir"]  # generate.py takes its net_ema.pt, else its latest registered checkpoint
    assert (run_dir / "net_ema.pt").is_file() or latest_checkpoint(run_dir) is not None, "the run has no weights"
    out = tmp_path / "samples"
    # 20 batches of 2 over 2 one-CPU workers; the sampler steps make the run long enough to kill mid-run
    args = [f"run={run_dir}", f"seeds=0-{SEEDS - 1}", "sampler.steps=250", "batch=2", "workers=2", "use_gpu=false",
            f"out={out}"]
    t = time.monotonic()
    job = Job(cluster, "generate", args, tmp_path / "logs")
    job.wait_for(lambda: len(pngs(out)) >= 4, "the first images", timeout=300)
    job.kill()
    say(f"generate: SIGKILL after {time.monotonic() - t:.1f} s with {len(pngs(out))} images")
    writers = cluster.actors("SampleWriter", job.started)  # the GCS keeps dead actors' records
    assert writers and {a["Address"]["NodeID"] for a in writers.values()} <= set(cluster.worker_nodes), writers
    # the killed driver's actors stop when Ray sees it gone: wait until nothing more is written
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 2.0:
        n = len(pngs(out))
        if n != last:
            last, stable_since = n, time.monotonic()
        time.sleep(0.1)
    # and until Ray has ended its actors, whose CPUs the rerun's two writers need
    deadline = time.monotonic() + 60
    while any(a["State"] != "DEAD" for a in cluster.actors("SampleWriter", job.started).values()):
        assert time.monotonic() < deadline, "the killed job's SampleWriter actors outlived it by a minute"
        time.sleep(0.1)
    before = pngs(out)
    # mid-run, with at least two batches left: the rerun shards them over both workers again
    assert 4 <= len(before) <= SEEDS - 4, f"the kill should land mid-run, {len(before)} of {SEEDS} were written"
    stamps = {s: (f.stat().st_ino, f.stat().st_mtime_ns) for s, f in before.items()}
    stale = out / "000000" / ".000039.png.12345.0123abcd.tmp"  # what a write cut by SIGKILL leaves
    stale.write_bytes(b"half a png")

    t = time.monotonic()
    again = Job(cluster, "generate", args, tmp_path / "logs")
    assert again.finish() == 0, again.tail()
    say(f"generate: rerun finished in {time.monotonic() - t:.1f} s")
    assert f"{SEEDS} seeds, {len(before)} already written" in again.stdout, again.tail()
    assert again.stdout.strip().splitlines()[-1] == f"run_dir: {out}"
    after = pngs(out)
    assert sorted(after) == list(range(SEEDS))  # every seed, each once (one file name per seed)
    assert {s: (after[s].stat().st_ino, after[s].stat().st_mtime_ns) for s in before} == stamps  # none rewritten
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    # the rerun's two writers (one CPU each) ran one on each worker node
    rerun_writers = cluster.actors("SampleWriter", again.started)
    assert len(rerun_writers) == 2, rerun_writers
    assert {a["Address"]["NodeID"] for a in rerun_writers.values()} == set(cluster.worker_nodes), rerun_writers
    assert "2 worker(s) on 1 CPU(s) each" in again.stdout


@pytest.mark.slow
def test_elastic_run_loses_a_node_and_finishes_on_the_one_left(cluster, tmp_path):
    """train.num_workers=[1,2] and no replacement: Ray Train restarts with one worker, from the last checkpoint,
    once a try for two has waited RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S. Runs last: it leaves one worker node."""
    assert len(cluster.worker_nodes) == 2
    run = train_with_node_loss(cluster, tmp_path, "[1,2]", fallback_rank=1, replace=False)
    check_training(run)
    survivor = (run["worker_nodes_before"] - {run["killed"]}).pop()
    assert set(cluster.worker_nodes) == {survivor}
    # the group that finished had one worker, on the node left
    assert run["last_nodes"] == {0: survivor}, (run["groups"], run["last_nodes"])
    assert len(run["groups"][0]) == 2
