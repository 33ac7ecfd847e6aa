"""Which peer was lost: one line when a collective fails because a rank, a host or a link died.

A host that dies mid-step shows up on its peers as a connection reset inside a collective (gloo:
"Connection reset by peer [addr]:port"); a link that goes down shows up only as the collective
timeout (`train.collective_timeout_s`), with no address at all. Either way torch raises from
whatever collective was running, which names neither the rank nor the host that is gone.

So every rank announces itself once, after the rendezvous, in the job's key-value store (the
TCPStore at MASTER_ADDR:MASTER_PORT that torchrun's agent or rank 0 serves): its hostname and the
address it reaches the master from. When a collective fails with a transport error, `lost_peer`
checks in there again ("alive") and waits a few seconds for the others: the ranks that never
check in are the lost ones, named with their hosts. A rank that cannot reach the store at all has
lost the store's host (rank 0's machine). The result is a :class:`~megaret.errors.PeerLost`, which
the entry point prints as one line and exit status 76 (run the job again: it resumes from its
newest checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from datetime import timedelta

from megaret.errors import PeerLost

log = logging.getLogger("megaret.peers")

#: transport failures of a collective (gloo, NCCL, the c10d store): a peer, its host or the link is gone
_TRANSPORT = re.compile(
    r"connection reset|connection closed|broken pipe|connection refused|timed out|timeout|"
    r"socket timeout|no route to host|network is unreachable|communicator was aborted|"
    r"remote process exited|ncclRemoteError|ncclSystemError", re.I)
_PEER_ADDR = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")
STORE_TIMEOUT_S = 5.0  # how long to try the store before calling its host lost
CHECK_IN_S = 10.0  # how long the survivors wait for each other's check-in


def is_transport_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is a collective's transport failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if name in ("DistNetworkError", "DistStoreError") or (
                isinstance(exc, RuntimeError) and _TRANSPORT.search(str(exc))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _prefix() -> str:
    """Keys of this launch: a new rendezvous (a requeue, torchrun's restart) gets new ones."""
    env = os.environ
    launch = env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID") or "job"
    again = env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
    return f"megaret/peers/{launch}/{again}/{env.get('MASTER_PORT', '')}"


def _store(timeout_s: float):
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _own_address(master: str) -> str:
    """The address this host reaches the master from (its address on the job's network)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 1))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
    except OSError:
        return "?"


def announce(rank: int, world_size: int) -> None:
    """Record this rank's host and address in the job's store (once, after the rendezvous)."""
    if world_size <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return
    try:
        me = f"{socket.gethostname()} {_own_address(os.environ['MASTER_ADDR'])}"
        _store(STORE_TIMEOUT_S).set(f"{_prefix()}/host/{rank}", me)
    except Exception as exc:  # noqa: BLE001 - only the lost-peer line loses its host names
        log.warning("could not record this rank's host in the job's store (%s): a lost peer will be named "
                    "by rank only", exc)


def _describe(ranks: Iterable[int], hosts: dict[int, str]) -> str:
    """'node2 (ranks 2, 3 at 169.254.77.2)' per host, for the given ranks."""
    by_host: dict[str, list[int]] = {}
    for r in sorted(ranks):
        by_host.setdefault(hosts.get(r, "an unknown host"), []).append(r)
    parts = []
    for host, rs in by_host.items():
        name, _, addr = host.partition(" ")
        label = "rank" if len(rs) == 1 else "ranks"
        parts.append(f"{name} ({label} {', '.join(map(str, rs))}{' at ' + addr if addr else ''})")
    return "; ".join(parts)


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)  # gloo's source location
    text = text.split(". This is typically caused", 1)[0]
    return text[:200]


def lost_peer(
    exc: BaseException, rank: int, world_size: int, timeout_s: float = CHECK_IN_S
) -> PeerLost | None:
    """A PeerLost naming the ranks and hosts that are gone, if `exc` is a collective's transport failure.

    Checks in at the store and waits up to `timeout_s` for every other rank to do the same."""
    if world_size <= 1 or not is_transport_failure(exc) or "MASTER_ADDR" not in os.environ:
        return None
    prefix, master = _prefix(), os.environ["MASTER_ADDR"]
    cause, me = _cause(exc), f"rank {rank} on {socket.gethostname()}"
    again = "run the job again: it resumes from the newest checkpoint in run.dir"
    try:
        store = _store(min(STORE_TIMEOUT_S, timeout_s))
        store.set(f"{prefix}/alive/{rank}", "1")
        others = [r for r in range(world_size) if r != rank]
        deadline = time.monotonic() + timeout_s
        missing = others
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = [r for r in missing if not store.check([f"{prefix}/alive/{r}"])]
        hosts = {r: store.get(f"{prefix}/host/{r}").decode() for r in range(world_size)
                 if store.check([f"{prefix}/host/{r}"])}
    except Exception:  # noqa: BLE001 - the store itself is gone: its host (rank 0's) is the lost one
        return PeerLost(f"lost peer: the job's store at MASTER_ADDR={master}:{os.environ.get('MASTER_PORT')} "
                        f"(rank 0's host) cannot be reached from {me} ({cause}); {again}")
    if not missing:
        m = _PEER_ADDR.search(str(exc))
        where = f" (the error names {m.group(1)})" if m else ""
        return PeerLost(f"lost peer: every rank is still up but a collective failed on {me}{where}: {cause}; "
                        f"{again}")
    return PeerLost(f"lost peer {_describe(missing, hosts)}: {me} saw {cause}; {again}")


def lost_peer_of(exc: BaseException) -> PeerLost | None:
    """`lost_peer` for this process's rank in the initialised world (None outside one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    return lost_peer(exc, dist.get_rank(), dist.get_world_size())
