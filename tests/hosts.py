"""Several "hosts" on this one machine, for multi-node tests (root only).

`hosts(n, root)` makes n network namespaces joined by one veth pair (two hosts) or by veth pairs
to a bridge in a switch namespace of its own (three or more), addressed on a private link-local
subnet (169.254.77.0/24), so traffic between them stays on those links and never touches the
machine's own interfaces. Each host has:

- its own hostname (a UTS namespace per command) and hosts file (`/etc/netns/<ns>/hosts`, bound
  over /etc/hosts in the command's mount namespace): every host name resolves to its veth address,
  not to Debian's 127.0.1.1, so `MASTER_ADDR=<host name>` works; `GLOO_SOCKET_IFNAME=eth0` is set;
- its own data cache: a mount namespace binds `<root>/<host>/cache` over one shared path
  (`Hosts.cache`), so one `data.cache_dir=<Hosts.cache>` override is per host, as on real machines
  (the shard verification stamps are per machine);
- the rest of the file system shared (run.dir on a file system both hosts see).

`Host.popen(argv)` starts a command on a host; `Host.kill_all()` SIGKILLs every process of the host
(its network namespace) and `Host.link(False)` takes its link down. On exit, also after a failure,
every process of every host is killed and the namespaces and their /etc/netns entries removed;
namespaces left by a session that was itself killed (its pid is gone) are removed on the next start.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mrhost"  # namespaces are named mrhost<pid>.<n>-<host>: the pid says whose they are
SUBNET = "169.254.77"
_made = itertools.count()  # several sets of hosts may exist at once in one process
IFACE = "eth0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _remove_netns(ns: str) -> None:
    for _ in range(3):  # a process may fork while we kill
        pids = netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    _ip("netns", "del", ns, check=False)
    etc = Path("/etc/netns") / ns
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()


def remove_stale() -> list[str]:
    """Remove mrhost namespaces whose creating process is gone (a session killed mid-test)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)\.\d+-\S+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _remove_netns(name)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One simulated machine: a network namespace with its hostname, address and cache."""

    name: str  # hostname, e.g. node1
    ns: str  # network namespace
    addr: str  # its address on the link
    cache: Path  # what the shared cache path shows on this host
    shared_cache: Path
    env: dict[str, str] = field(default_factory=dict)

    def command(self, argv: list[str]) -> list[str]:
        """argv run on this host: its network, hostname and cache mount, GLOO_SOCKET_IFNAME=eth0."""
        q = shlex.quote
        setup = (f"hostname {q(self.name)} && mount --bind /etc/netns/{q(self.ns)}/hosts /etc/hosts && "
                 f"mount --bind {q(str(self.cache))} {q(str(self.shared_cache))} && "
                 f'exec env GLOO_SOCKET_IFNAME={IFACE} "$@"')
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup file systems slurmd needs
        return ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", setup, "sh", *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        return netns_pids(self.ns)

    def kill_all(self) -> int:
        """SIGKILL every process of this host at once; how many there were."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def link(self, up: bool) -> None:
        """Bring this host's link up or down (down: packets are dropped, no connection is reset)."""
        _ip("-n", self.ns, "link", "set", IFACE, "up" if up else "down")


@dataclass
class Hosts:
    hosts: list[Host]
    cache: Path  # the one path every host sees its own cache at

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)


def _hosts_file(hosts: list[tuple[str, str]]) -> str:
    lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for name, addr in hosts]
    return "\n".join(lines) + "\n"


@contextmanager
def hosts(n: int, root: Path, names: list[str] | None = None) -> Iterator[Hosts]:
    """n hosts (node1..nodeN unless `names`), addresses 169.254.77.1..n; removed on exit."""
    if os.geteuid() != 0:
        raise PermissionError("network namespaces need root")
    remove_stale()
    names = names or [f"node{i + 1}" for i in range(n)]
    tag = f"{PREFIX}{os.getpid()}.{next(_made)}"
    made: list[str] = []
    shared_cache = root / "cache"
    shared_cache.mkdir(parents=True, exist_ok=True)
    table = [(name, f"{SUBNET}.{i + 1}") for i, name in enumerate(names)]
    try:
        members = []
        for name, addr in table:
            ns = f"{tag}-{name}"
            _ip("netns", "add", ns)
            made.append(ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(_hosts_file(table))
            _ip("-n", ns, "link", "set", "lo", "up")
            cache = root / name / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            members.append(Host(name, ns, addr, cache, shared_cache))
        if n == 2:
            a, b = members
            _ip("link", "add", IFACE, "netns", a.ns, "type", "veth", "peer", "name", IFACE, "netns", b.ns)
        else:
            switch = f"{tag}-switch"
            _ip("netns", "add", switch)
            made.append(switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for i, h in enumerate(members):
                port = f"p{i}"
                _ip("link", "add", IFACE, "netns", h.ns, "type", "veth", "peer", "name", port,
                    "netns", switch)
                _ip("-n", switch, "link", "set", port, "master", "br0")
                _ip("-n", switch, "link", "set", port, "up")
        for h in members:
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", IFACE)
            _ip("-n", h.ns, "link", "set", IFACE, "up")
        yield Hosts(members, shared_cache)
    finally:
        for ns in made:
            _remove_netns(ns)
