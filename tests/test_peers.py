"""megaret/parallel/peers.py in one process: a real TCPStore stands in for the job's store, the other
ranks' announcements and check-ins are written into it by the test (the launches across hosts are in
tests/test_multinode.py)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from megaret.entry import run_entry
from megaret.errors import EXIT_PEER_LOST, PeerLost
from megaret.parallel import peers

RESET = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                     "[10.0.0.2]:40123: Connection reset by peer. This is typically caused by a remote "
                     "worker hanging or bugs in the application.")
TIMEOUT = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                       "waiting 20000ms for recv operation to complete")


@pytest.fixture
def store(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5),
                           wait_for_workers=False)
    for key in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return master


def test_transport_failures_are_told_from_other_errors():
    assert peers.is_transport_failure(RESET) and peers.is_transport_failure(TIMEOUT)
    try:
        raise ValueError("wrapped") from RESET
    except ValueError as exc:
        assert peers.is_transport_failure(exc)
    assert not peers.is_transport_failure(RuntimeError("shape mismatch (2, 3) vs (3, 2)"))
    assert peers.lost_peer(RuntimeError("shape mismatch"), 0, 4) is None
    assert peers.lost_peer(RESET, 0, 1) is None  # a world of one has no peers


def test_the_ranks_that_do_not_check_in_are_named_with_their_host(store):
    prefix = peers._prefix()
    peers.announce(0, 4)
    for rank, host in ((1, "node1 10.0.0.1"), (2, "node2 10.0.0.2"), (3, "node2 10.0.0.2")):
        store.set(f"{prefix}/host/{rank}", host)
    store.set(f"{prefix}/alive/1", "1")  # rank 1 (same host as rank 0) failed too and checked in
    lost = peers.lost_peer(RESET, 0, 4, timeout_s=1.0)
    assert isinstance(lost, PeerLost)
    line = str(lost)
    assert line.startswith("lost peer node2 (ranks 2, 3 at 10.0.0.2): rank 0 on ")
    assert "Read error [10.0.0.2]:40123: Connection reset by peer;" in line and "typically" not in line
    assert "resumes from the newest checkpoint" in line and "\n" not in line
    assert store.get(f"{prefix}/alive/0") == b"1"


def test_an_unreachable_store_names_rank_0s_host(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    lost = peers.lost_peer(TIMEOUT, 2, 4, timeout_s=1.0)
    assert str(lost).startswith(f"lost peer: the job's store at MASTER_ADDR=127.0.0.1:{port} (rank 0's host) "
                                "cannot be reached from rank 2 on ")
    assert "Timed out waiting 20000ms for recv operation to complete" in str(lost)


def test_every_rank_up_says_so(store):
    for rank in range(3):
        store.set(f"{peers._prefix()}/alive/{rank}", "1")
    assert "every rank is still up" in str(peers.lost_peer(RESET, 0, 3, timeout_s=1.0))


def test_the_entry_prints_one_line_and_exits_76(capsys):
    def body():
        raise PeerLost("lost peer node2 (ranks 2, 3 at 10.0.0.2): rank 0 on node1 saw it; run the job again")

    with pytest.raises(SystemExit) as exit_:
        run_entry(body)
    assert exit_.value.code == EXIT_PEER_LOST == 76
    assert capsys.readouterr().err == ("megaret: error: lost peer node2 (ranks 2, 3 at 10.0.0.2): rank 0 on "
                                       "node1 saw it; run the job again\n")
