"""Two real hosts on this machine (tests/hosts.py: network namespaces, a veth link, own hostnames,
hosts files and data caches), root only:

- torchrun across hosts (`--nnodes 2 --rdzv-backend c10d`): TP=2 inside each host with DP across
  them, and TP=2 x PP=2 with the pipeline across them; losses and final weights equal a one-host
  run of the same layout, bit for bit;
- shared and per-host state: run.dir on a file system both hosts see, one checkpoint manifest
  listing the files both hosts wrote (and which host wrote them), verified; shard verification
  stamps in each host's own cache;
- faults: every process of one host killed mid-step (its peers see a connection reset) and,
  separately, the link taken down mid-step (only the collective timeout can notice): the ranks
  exit within train.collective_timeout_s (plus the launcher's grace) with one line naming the lost
  peer, and the relaunched job resumes to the final weights of the uninterrupted run; a host that
  never joins makes the rendezvous time out;
- SLURM across the hosts: slurmctld plus one slurmd per host (tests/multinode_slurm.py), a 2-node
  job submitted by launcher/submit.py through submitit, requeued by `scontrol requeue` and by
  preemption, resumes to the same weights.

Timings (rendezvous, failure detection, requeue) are printed (`-s`).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaret.checkpoint.consolidate import consolidate
from megaret.checkpoint.files import list_checkpoints, verify
from megaret.errors import EXIT_PEER_LOST
from megaret.faults import plan_env
from tests.conftest import REPO, tensorboard_scalars

pytestmark = [pytest.mark.root_install, pytest.mark.multiproc]

STEPS = 12
TIMEOUT_S = 20  # train.collective_timeout_s in these tests (default 1800)
JOIN_TIMEOUT_S = 60  # torchrun's rendezvous join timeout (default 600)
GRACE_S = 45  # torchrun: its monitor interval, stopping the other workers, the check-in window
COMMON = [
    "parallel.backend=gloo", "train.log_interval=1", "train.eval_steps=0", f"train.steps={STEPS}",
    "checkpoint.interval=3", "checkpoint.keep_last=100", f"train.collective_timeout_s={TIMEOUT_S}",
    "data.seq_length=16", "model.vocab_size=384", "data.source=shards",
]
DP_ACROSS = ["parallel.tensor=2"]  # 4 ranks: TP pairs on each host, DP across the hosts
PP_ACROSS = ["parallel.tensor=2", "parallel.pipeline=2"]  # TP pairs on each host, PP across
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
           CUDA_VISIBLE_DEVICES="")  # gloo ranks on the CPU


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (the simulated hosts): run as root")
    from tests.hosts import hosts

    with hosts(2, tmp_path_factory.mktemp("hosts")) as hs:
        yield hs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    from tests.data_fixtures import build_tiny

    manifest = build_tiny(tmp_path_factory.mktemp("data"))
    return [f"data.paths=[{manifest}]"]


def one_host(run_dir: Path, layout: list[str], data: list[str]) -> Path:
    """The same global layout on one host: torchrun with 4 local ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()),
           "-m", "megaret.train", "--config", "configs/tiny.yaml", *COMMON,
           *layout, *data, f"data.cache_dir={run_dir.parent / 'cache-one-host'}", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def reference_dp(tmp_path_factory, data):
    return one_host(tmp_path_factory.mktemp("one-host-dp") / "run", DP_ACROSS, data)


@pytest.fixture(scope="module")
def reference_pp(tmp_path_factory, data):
    return one_host(tmp_path_factory.mktemp("one-host-pp") / "run", PP_ACROSS, data)


class TwoHostRun:
    """One torchrun agent per host (`--nnodes 2 --rdzv-backend c10d`, endpoint node1), 2 ranks each."""

    def __init__(self, net, run_dir: Path, layout: list[str], data: list[str], tag: str,
                 faults: dict | None = None, rdzv_id: str | None = None) -> None:
        self.logs = {h.name: run_dir.parent / f"{tag}-{h.name}.log" for h in net}
        self.t0 = time.time()
        port = _port()
        env = dict(ENV, LOGLEVEL="INFO")  # torchrun's agent logs when its rendezvous completes
        env.update(plan_env(**faults) if faults else {})
        self.procs = {}
        for h in net:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{net[0].name}:{port}",
                   "--rdzv-id", rdzv_id or tag, "--rdzv-conf", f"join_timeout={JOIN_TIMEOUT_S}",
                   "-m", "megaret.train", "--config", "configs/tiny.yaml", *COMMON, *layout, *data,
                   f"data.cache_dir={net.cache}", f"run.dir={run_dir}"]
            with open(self.logs[h.name], "a") as out:
                self.procs[h.name] = h.popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def text(self, host: str) -> str:
        return self.logs[host].read_text(errors="replace")

    def wait_for(self, pattern: str, host: str = "node1", timeout: float = 600) -> float:
        """Seconds since launch when `pattern` appeared in `host`'s log."""
        rx = re.compile(pattern, re.M)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if rx.search(self.text(host)):
                return time.time() - self.t0
            if all(p.poll() is not None for p in self.procs.values()):
                if rx.search(self.text(host)):  # written just before the end
                    return time.time() - self.t0
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in {host}'s log:\n{self.text(host)[-4000:]}")

    def wait(self, timeout: float = 900) -> dict[str, int]:
        return {name: p.wait(timeout=timeout) for name, p in self.procs.items()}

    def tails(self) -> str:
        return "\n".join(f"--- {name}\n{self.text(name)[-3000:]}" for name in self.logs)


def final_weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    step, ckpt = list_checkpoints(run_dir / "checkpoints")[-1]
    state, _ = consolidate(ckpt)
    return step, {k: v for k, v in state.items() if torch.is_tensor(v)}


def assert_same_training(run_dir: Path, reference: Path) -> tuple[int, float]:
    """Losses of every step and final weights equal the reference run's, bit for bit."""
    losses, ref_losses = tensorboard_scalars(run_dir), tensorboard_scalars(reference)
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1)), ref_losses
    assert losses == ref_losses, (losses, ref_losses)
    step, w = final_weights(run_dir)
    ref_step, ref_w = final_weights(reference)
    assert step == ref_step == STEPS and w.keys() == ref_w.keys() and w
    diff = max((w[k] - ref_w[k]).abs().max().item() for k in w)
    assert all(torch.equal(w[k], ref_w[k]) for k in w), f"max |diff| {diff}"
    return len(w), diff


# ---------------------------------------------------------------------------------------------
# the harness


def test_hosts_have_their_own_names_addresses_and_caches(net, tmp_path):
    from tests.hosts import hosts

    for h in net:
        out = h.run(["sh", "-c", f"hostname; getent hosts {net[0].name} {net[1].name}; "
                                 f"echo $GLOO_SOCKET_IFNAME; echo {h.name} > {net.cache}/whoami"])
        assert out.returncode == 0, out.stderr
        name, *rest = out.stdout.split("\n")
        assert name == h.name and rest[2] == "eth0"
        assert "169.254.77.1" in rest[0] and "169.254.77.2" in rest[1]  # not 127.0.1.1
        assert (h.cache / "whoami").read_text().strip() == h.name
    assert not (net.cache / "whoami").exists()  # only the hosts see their caches there
    # a third host joins through a bridge; a connection crosses it
    with hosts(3, tmp_path) as three:
        server = three[0].popen([sys.executable, "-c", "import socket; s = socket.create_server(('0.0.0.0', "
                                 "7000)); c, a = s.accept(); print(c.recv(16).decode(), a[0])"],
                                stdout=subprocess.PIPE, text=True)
        for _ in range(50):
            client = three[2].run([sys.executable, "-c", "import socket; socket.create_connection(('node1', "
                                   "7000), timeout=2).send(b'hello')"])
            if client.returncode == 0:
                break
            time.sleep(0.1)
        assert server.communicate(timeout=30)[0].split() == ["hello", "169.254.77.3"]


# ---------------------------------------------------------------------------------------------
# torchrun across hosts, shared and per-host state


@pytest.fixture(scope="module")
def dp_across(net, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two-host-dp") / "run"
    run = TwoHostRun(net, run_dir, DP_ACROSS, data, "dp")
    t_rdzv = max(run.wait_for(r"Rendezvous complete for workers", host=h.name) for h in net)
    t_world = run.wait_for(r"^parallel: world 4")
    rcs = run.wait()
    assert rcs == {"node1": 0, "node2": 0}, run.tails()
    return run_dir, (t_rdzv, t_world, time.time() - run.t0)


def test_torchrun_across_hosts_dp_across_equals_one_host(dp_across, reference_dp):
    run_dir, (t_rdzv, t_world, total) = dp_across
    tensors, diff = assert_same_training(run_dir, reference_dp)
    print(f"torchrun 2 hosts x 2 ranks (TP=2 in a host, DP=2 across): launch -> rendezvous complete on "
          f"both agents {t_rdzv:.1f}s, -> all ranks connected {t_world:.1f}s, -> done {total:.1f}s; {STEPS} "
          f"losses and {tensors} final tensors equal the one-host run (max |diff| {diff})")


def test_one_manifest_lists_both_hosts_files_and_each_host_stamps_its_shards(dp_across, net, data):
    run_dir = dp_across[0]
    for _, ckpt in list_checkpoints(run_dir / "checkpoints"):
        manifest = verify(ckpt)  # every listed file's size and sha256
        hosts = {r["rank"]: r["host"] for r in manifest["ranks"]}
        assert hosts == {0: "node1", 1: "node1", 2: "node2", 3: "node2"}, hosts
        listed = set(manifest["files"])
        assert {f"rank_{r:05d}.pt" for r in range(4)} <= listed
        # each DP rank's ZeRO shard, written on its own host (dp 1 lives on node2)
        zero = {f"ds/zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" for dp in (0, 1) for tp in (0, 1)}
        assert zero <= listed
    manifest_path = Path(data[0].split("[", 1)[1].rstrip("]"))
    shards = sorted(manifest_path.parent.glob("train-*.tar"))
    for h in net:  # the first local rank of each host verified every shard and stamped it in its own cache
        assert len(list((h.cache / "verified").glob("*.json"))) == len(shards), h.name
    assert not (net.cache / "verified").exists()


def test_torchrun_across_hosts_pp_across_equals_one_host(net, data, reference_pp, tmp_path):
    run = TwoHostRun(net, tmp_path / "run", PP_ACROSS, data, "pp")
    t_world = run.wait_for(r"^parallel: world 4")
    assert run.wait() == {"node1": 0, "node2": 0}, run.tails()
    tensors, diff = assert_same_training(tmp_path / "run", reference_pp)
    print(f"torchrun 2 hosts x 2 ranks (TP=2 in a host, PP=2 across): all ranks up {t_world:.1f}s; "
          f"{STEPS} losses and {tensors} final tensors equal the one-host run")


# ---------------------------------------------------------------------------------------------
# faults across hosts


LOST = re.compile(r"^megaret: error: lost peer (node\d) \(ranks (\d), (\d) at (169\.254\.77\.\d)\)", re.M)


def test_a_dead_host_and_a_dead_link_stop_the_job_naming_the_peer_and_it_resumes(
        net, data, reference_dp, tmp_path):
    run_dir = tmp_path / "run"
    slow = {"sleep_each_step_s": 0.5}  # the kills land mid-run
    timings = {}

    # 1. kill -9 every process of node2 mid-step: node1's ranks see a connection reset at once
    run = TwoHostRun(net, run_dir, DP_ACROSS, data, "kill", faults=slow)
    run.wait_for(r"^step\s+5/")
    t_kill = time.time()
    assert net[1].kill_all() >= 3  # its torchrun agent and both ranks
    rc = run.procs["node1"].wait(timeout=TIMEOUT_S + GRACE_S)
    timings["kill -9 -> node1 exits"] = time.time() - t_kill
    run.procs["node2"].wait(timeout=30)
    text = run.text("node1")
    assert rc != 0 and re.search(rf"exitcode\s*:\s*{EXIT_PEER_LOST}\b", text), run.tails()
    named = LOST.findall(text)
    assert sorted(n[:3] for n in named) == [("node2", "2", "3")] * 2, run.tails()  # one line per rank
    assert "Connection" in text and "Traceback (most recent call last)" not in text.split("lost peer")[0]
    first = list_checkpoints(run_dir / "checkpoints")[-1][0]

    # 2. relaunch (the requeue): it resumes; then node2's link goes down mid-step: nothing is reset,
    #    only the collective timeout notices, on both hosts
    run = TwoHostRun(net, run_dir, DP_ACROSS, data, "link", faults=slow)
    run.wait_for(rf"resumed from \S+step_0*{first}\b")
    # step first+4 starts only once the checkpoint at first+3 is committed on every rank
    run.wait_for(rf"^step\s+{first + 4}/")
    t_down = time.time()
    net[1].link(False)
    try:
        rc = run.procs["node1"].wait(timeout=TIMEOUT_S + GRACE_S)
        timings["link down -> node1 exits"] = time.time() - t_down
        # node2's ranks give up as well; its torchrun agent cannot tell node1's store it is leaving
        # until the link is back
        run.wait_for(r"lost peer(?:.|\n)*lost peer", host="node2", timeout=TIMEOUT_S + GRACE_S)
        timings["link down -> node2's ranks exit"] = time.time() - t_down
    finally:
        net[1].link(True)
    assert rc != 0 and run.procs["node2"].wait(timeout=120) != 0, run.tails()
    assert [n[:3] for n in LOST.findall(run.text("node1"))] == [("node2", "2", "3")] * 2, run.tails()
    # only a timeout can notice a dead link (gloo words it "Timed out" or "Socket Timeout")
    assert re.search(r"(?i)timed? ?out", run.text("node1")), run.tails()
    # node2 cannot reach the job's store on node1 (rank 0's host) any more: that is its lost peer
    store_lost = re.compile(r"^megaret: error: lost peer: the job's store at MASTER_ADDR=node1:\d+ "
                            r"\(rank 0's host\)", re.M)
    assert len(store_lost.findall(run.text("node2"))) == 2, run.tails()
    second = list_checkpoints(run_dir / "checkpoints")[-1][0]
    assert second > first

    # 3. the link is back: the job runs again and ends with the uninterrupted run's weights
    run = TwoHostRun(net, run_dir, DP_ACROSS, data, "final")
    assert run.wait() == {"node1": 0, "node2": 0}, run.tails()
    assert re.search(rf"resumed from \S+step_0*{second}\b", run.text("node1")), run.tails()
    step, w = final_weights(run_dir)
    ref_step, ref_w = final_weights(reference_dp)
    assert step == ref_step == STEPS and w.keys() == ref_w.keys()
    assert all(torch.equal(w[k], ref_w[k]) for k in w)
    print(f"faults across hosts (train.collective_timeout_s={TIMEOUT_S}): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
          + f"; resumed from steps {first} and {second}; final weights equal the uninterrupted run")


def test_a_host_that_never_joins_times_out_the_rendezvous(net, tmp_path):
    join_s = 10
    t0 = time.time()
    out = net[0].run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{net[0].name}:{_port()}",
                      "--rdzv-id", "alone", "--rdzv-conf", f"join_timeout={join_s}", "-m", "megaret.train",
                      "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}"],
                     env=ENV, cwd=REPO, timeout=join_s + 120)
    waited = time.time() - t0
    assert out.returncode != 0 and "RendezvousTimeoutError" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # no rank ever started
    assert join_s <= waited <= join_s + 60, waited
    print(f"a host that never joins: torchrun's rendezvous gave up after {waited:.1f}s "
          f"(join_timeout={join_s})")


# ---------------------------------------------------------------------------------------------
# SLURM across the hosts


@pytest.fixture(scope="module")
def cluster(net, tmp_path_factory):
    from tests.multinode_slurm import slurm_cluster

    with slurm_cluster(net, tmp_path_factory.mktemp("slurm")) as c:
        print(f"SLURM across 2 hosts up in {c.startup_s:.1f}s (slurmctld on node1, a slurmd on each host)")
        yield c


def test_slurm_two_node_job_is_requeued_and_preempted_and_ends_as_the_one_host_run(
        cluster, net, data, reference_dp, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(cluster.env, **{k: ENV[k] for k in ("OMP_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED",
                                                   "CUDA_VISIBLE_DEVICES")},
               **plan_env(sleep_each_step_s=1.0))  # the interruptions land mid-run
    t0 = time.time()
    launch = ["launch.nodes=2", "launch.tasks_per_node=2", "launch.cpus_per_task=1", "launch.gpus_per_node=1",
              "launch.time_min=20"]
    out = net[0].run([sys.executable, "launcher/submit.py", "--config", "configs/tiny.yaml", *COMMON,
                      *DP_ACROSS, *data, f"data.cache_dir={net.cache}", *launch, f"run.dir={run_dir}"],
                     env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"submitted job (\d+) \(slurm\)", out.stdout).group(1)
    logs = run_dir / "submitit"

    def latest() -> int:
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1][0] if found else 0

    def wait(cond, what: str, timeout: float = 600) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return time.time()
            time.sleep(0.25)
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                          for p in sorted(logs.glob("*_log.*")))
        raise AssertionError(f"timed out waiting for: {what} (job {cluster.job(job_id)})\n{tails}\n"
                             f"{cluster.logs()}")

    def running(restarts: int):
        return lambda: (lambda j: j.get("JobState") == "RUNNING" and j.get("Restarts") == str(restarts))(
            cluster.job(job_id))

    t_run = wait(running(0), "the 2-node job runs")
    interrupts = [("scontrol requeue", ["scontrol", "requeue", job_id]),
                  ("preempted by partition high",
                   ["sbatch", "-p", "high", "-N", "2", "--exclusive", "--parsable", "-o", "/dev/null",
                    "--wrap", "sleep 3"])]
    seen, events, resumed_at = 0, [], []
    for restarts, (name, cmd) in enumerate(interrupts, start=1):
        wait(lambda seen=seen: latest() > seen, f"a checkpoint after step {seen} before '{name}'")
        t_sig = time.time()
        cluster.run(*cmd)
        t_again = wait(running(restarts), f"running again after '{name}'")
        resumed_at.append(latest())  # the newest checkpoint when it starts again: where it must resume
        events.append(f"{name}: running again {t_again - t_sig:.1f}s later")
        seen = latest()
    wait(lambda: cluster.job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job ends")
    job = cluster.job(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", job
    assert job["NodeList"] in ("node[1-2]", "node1,node2"), job

    text = (logs / f"{job_id}_0_log.out").read_text(errors="replace") + \
        (logs / f"{job_id}_0_log.err").read_text(errors="replace")
    assert "task 2/4 on node2" in (logs / f"{job_id}_2_log.out").read_text(errors="replace")
    resumed = [int(s) for s in re.findall(r"resumed from \S+step_(\d+) \(step", text)]
    assert resumed == resumed_at, (resumed, resumed_at, text[-3000:])  # no step lost or repeated
    losses, ref_losses = tensorboard_scalars(run_dir), tensorboard_scalars(reference_dp)
    assert set(losses) == set(ref_losses), (losses, ref_losses)  # a step run twice logged the same loss
    assert {s for s, _ in losses} == set(range(1, STEPS + 1))
    step, w = final_weights(run_dir)
    _, ref_w = final_weights(reference_dp)
    assert step == STEPS and w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)
    print(f"SLURM job {job_id} on node1+node2 (TP=2 in a node, DP across): started {t_run - t0:.1f}s after "
          f"submission; {'; '.join(events)}; resumed from steps {resumed}; submit -> done "
          f"{time.time() - t0:.1f}s; losses and final weights equal the one-host run")
