"""The link between the ``--workers`` parent and each worker: readiness, reloads, metrics.

Typical use (``gproxy._supervisor`` and ``gproxy.cli`` are the callers)::

    # the parent, on its links hub (a thread of its own)
    links = Links(config_text=None)
    links.attach(index, parent_end, pid)      # each worker started; sends it the config in force
    links.all_ready(indexes)                  # every one of them accepts
    links.collect()                           # [(rule, source)] summed over workers, for /metrics
    links.reload(path)                        # validate once, reserve, every worker applies it

    # a worker
    start, listening = read_start(fd)         # its listening sockets; with -c, the file's text
    serve(sock, {"metrics": ..., "reload": ..., "abort": ...}, lock)   # a greenlet on its hub
    send(fd_socket, {"op": "ready"})

One ``socketpair`` per worker, made when the worker starts: the parent's end is non-inheritable,
the worker's is passed as ``--worker-channel FD``. A message is a 4-byte big-endian length and
that much JSON. The parent asks (``{"op": ..., "id": n}``), the worker answers with the same
``id``; the worker sends ``{"op": "ready"}`` unasked once it accepts, and a last metrics snapshot
unasked when it has drained and exits. Nothing here runs per connection or per chunk: a worker
answers on its own hub, in a greenlet of its own, off the forwarding path.

Metrics: a scrape asks every worker for a snapshot of its rules' counters (one pass over its
rules, never its connections) and adds them up. A worker that has not answered within
``ANSWER_TIMEOUT`` is counted with its last snapshot, so a page never leaves a worker out; a
worker that dies is folded in with its last snapshot (its counters, not its gauges), so
counters never go down when it is started again. What a killed worker counted after the last
snapshot it gave is lost (a worker that stops by itself sends one last snapshot first).
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from gproxy.stats import Counters, Outcome, TargetCounters, TargetView

__all__ = ["Links", "read_start", "serve", "send", "snapshot", "ANSWER_TIMEOUT", "RELOAD_TIMEOUT"]

log = logging.getLogger("gproxy.workers")

#: how long a scrape waits for a worker's snapshot before it takes the last one it has
ANSWER_TIMEOUT = 1.0
#: how long a reload waits for each worker to apply it (a worker binds its new listeners)
RELOAD_TIMEOUT = 30.0
_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 256 << 20  # a config file or a snapshot of many thousand rules fits


# -- framing -------------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    if any(isinstance(value, Raw) for value in message.values()):
        text = "{" + ",".join(json.dumps(key) + ":" + (value.text if isinstance(value, Raw) else
                                                        json.dumps(value, separators=(",", ":")))
                              for key, value in message.items()) + "}"
    else:
        text = json.dumps(message, separators=(",", ":"))
    data = text.encode("utf-8")
    return _HEADER.pack(len(data)) + data


def _read_exactly(sock, n: int) -> Optional[bytes]:
    chunks: List[bytes] = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


#: fds one message carries at most (the kernel's SCM_MAX_FD is 253)
MAX_FDS = 250


def receive(sock) -> Optional[dict]:
    """The next message, or None at EOF (the other end has gone); the fds it carried (listening
    sockets, SCM_RIGHTS) are its ``"fds"``. Works on a blocking socket and a gevent one alike."""
    first, ancillary, _flags, _address = sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: List[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    try:
        if not first:
            return None
        rest = _read_exactly(sock, _HEADER.size - len(first)) if len(first) < _HEADER.size else b""
        if rest is None:
            return None
        (size,) = _HEADER.unpack(first + rest)
        if size > _MAX_MESSAGE:
            raise OSError(f"a message of {size} bytes on the workers' link")
        data = _read_exactly(sock, size)
        if data is None:
            return None
        message = json.loads(data.decode("utf-8"))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    message["fds"] = fds
    return message


def send(sock, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = encode(message)
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


def send_listeners(sock, entries: Sequence[Tuple[str, str, int]]) -> None:
    """Listening sockets for a worker, ``(rule, listen as its rule says it, fd)``, in messages of
    at most MAX_FDS fds; the worker keeps them (``Passed``) for the rules that ask for them."""
    for start in range(0, len(entries), MAX_FDS):
        part = entries[start:start + MAX_FDS]
        send(sock, {"op": "listeners", "listeners": [[name, spec] for name, spec, _fd in part]},
             [fd for _name, _spec, fd in part])


# -- counters across the link --------------------------------------------------------------------


#: rules per slice of a snapshot, between two passes of the worker's event loop: about 1 ms of
#: making and encoding (1,000 rules with a target each: 20 ms in one go, measured)
SNAPSHOT_SLICE = 50


class Raw:
    """JSON text already made, put in a message as it is (a worker's snapshot, made in slices)."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _rule_data(c: Counters) -> Dict[str, Any]:
    return {
        "accepted": c.accepted, "connect_failed": c.connect_failed,
        "bytes_upstream": c.bytes_upstream, "bytes_downstream": c.bytes_downstream, "active": c.active,
        "outcomes": {o.name: n for o, n in c.outcomes.items()},
        "durations": list(c.durations), "duration_sum": c.duration_sum,
        "target_failures": dict(c.target_failures),
        "views": {t: [v.up, v.state, v.weight, v.check_duration] for t, v in c.views().items()},
        "targets": {t: {"active": tc.active, "outcomes": {o.name: n for o, n in tc.outcomes.items()},
                        "bytes_upstream": tc.bytes_upstream, "bytes_downstream": tc.bytes_downstream,
                        "failures": dict(tc.failures)} for t, tc in c.targets.copy().items()},
    }


def snapshot(sources: Iterable, pace: Optional[Callable[[], None]] = None) -> Raw:
    """``[[rule, counters as plain data], ...]`` as JSON, for ``(name, forwarder)`` pairs or
    forwarders: what a worker answers a scrape with. One pass over the rules, never the
    connections; with ``pace``, called between slices of SNAPSHOT_SLICE rules (a pass of the
    event loop, so that forwarding goes on while a big snapshot is made). Each rule is read
    at once: its counters are one snapshot."""
    parts: List[str] = []
    for count, source in enumerate(list(sources), 1):
        name, source = source if isinstance(source, tuple) else (source.name, source)
        parts.append(json.dumps([str(name), _rule_data(source.counters)], separators=(",", ":")))
        if pace is not None and count % SNAPSHOT_SLICE == 0:
            pace()
    return Raw("[" + ",".join(parts) + "]")


def _add(into: Counters, data: Mapping[str, Any], views: Dict[str, TargetView], gauges: bool) -> None:
    """Add one worker's snapshot of a rule to ``into``; ``gauges`` False for a dead worker's
    (its open connections are gone, its targets' health is no one's now)."""
    into.accepted += data["accepted"]
    into.connect_failed += data["connect_failed"]
    into.bytes_upstream += data["bytes_upstream"]
    into.bytes_downstream += data["bytes_downstream"]
    for name, count in data["outcomes"].items():
        into.outcomes[Outcome[name]] += count
    for i, count in enumerate(data["durations"]):
        into.durations[i] += count
    into.duration_sum += data["duration_sum"]
    for target, count in data["target_failures"].items():
        into.target_failures[target] = into.target_failures.get(target, 0) + count
    for target, tdata in data["targets"].items():
        counts = into.targets.get(target)
        if counts is None:
            counts = into.targets[target] = TargetCounters()
        for name, count in tdata["outcomes"].items():
            counts.outcomes[Outcome[name]] += count
        counts.bytes_upstream += tdata["bytes_upstream"]
        counts.bytes_downstream += tdata["bytes_downstream"]
        for reason, count in tdata["failures"].items():
            counts.failures[reason] = counts.failures.get(reason, 0) + count
        if gauges:
            counts.active += tdata["active"]
    if not gauges:
        return
    into.active += data["active"]
    for target, (up, state, weight, duration) in data["views"].items():
        seen = views.get(target)
        if seen is None:
            views[target] = TargetView(bool(up), state, weight, duration)
        else:  # down if any worker has it down; the slowest check
            durations = [d for d in (seen.check_duration, duration) if d is not None]
            views[target] = TargetView(seen.up and bool(up), seen.state, seen.weight,
                                       max(durations) if durations else None)


def _fold(into: Dict[str, Any], data: Mapping[str, Any]) -> None:
    """Add a dead worker's last snapshot of a rule to the retired totals (plain data)."""
    for key in ("accepted", "connect_failed", "bytes_upstream", "bytes_downstream", "duration_sum"):
        into[key] = into.get(key, 0) + data[key]
    for key in ("outcomes", "target_failures"):
        mine = into.setdefault(key, {})
        for name, count in data[key].items():
            mine[name] = mine.get(name, 0) + count
    durations = into.setdefault("durations", [0] * len(data["durations"]))
    for i, count in enumerate(data["durations"]):
        durations[i] += count
    targets = into.setdefault("targets", {})
    for target, tdata in data["targets"].items():
        mine = targets.setdefault(target, {"active": 0, "outcomes": {}, "bytes_upstream": 0,
                                           "bytes_downstream": 0, "failures": {}})
        mine["bytes_upstream"] += tdata["bytes_upstream"]
        mine["bytes_downstream"] += tdata["bytes_downstream"]
        for key in ("outcomes", "failures"):
            for name, count in tdata[key].items():
                mine[key][name] = mine[key].get(name, 0) + count
    into.setdefault("active", 0)
    into.setdefault("views", {})


def _read(path: str):
    """The file's text and what it says, validated: ``ConfigError`` as ``load`` words it."""
    from gproxy._configfile import parse
    from gproxy.config import ConfigError
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read it: {os.strerror(exc.errno).lower() if exc.errno else exc}") \
            from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start})") from None
    return text, parse(text, path)


class _Summed:
    """A rule as the metrics page reads it: ``.counters`` added up over the workers."""

    __slots__ = ("counters",)

    def __init__(self, counters: Counters):
        self.counters = counters


# -- the parent's side ---------------------------------------------------------------------------


class _Link:
    """One worker's link, on the parent's links hub: a reader greenlet and the answers awaited."""

    def __init__(self, index: int, sock: socket.socket, pid: int, on_ready: Callable[[], None]):
        import gevent
        from gevent import socket as gsocket
        from gevent.lock import Semaphore

        self.index, self.pid = index, pid
        self.sock = gsocket.socket(sock.family, sock.type, fileno=sock.detach())
        self.ready = False
        self.last: Optional[List[list]] = None  # its last metrics snapshot
        self.answers: Dict[int, Any] = {}       # id -> AsyncResult
        self.next_id = 0
        self.writing = Semaphore()
        self.on_ready = on_ready
        self.reader = gevent.spawn(self._read)

    def ask(self, message: Dict[str, Any]):
        """Send a request; returns the AsyncResult its answer (or None at EOF) is set on."""
        from gevent.event import AsyncResult
        self.next_id += 1
        answer = self.answers[self.next_id] = AsyncResult()
        try:
            self.tell({**message, "id": self.next_id})
        except OSError:
            self.answers.pop(self.next_id, None)
            answer.set(None)
        return answer

    def tell(self, message: Mapping[str, Any]) -> None:
        with self.writing:
            send(self.sock, message)

    def _read(self) -> None:
        try:
            while True:
                message = receive(self.sock)
                if message is None:
                    break
                if "metrics" in message:
                    self.last = message["metrics"]
                if message.get("op") == "ready":
                    self.ready = True
                    self.on_ready()
                answer = self.answers.pop(message.get("id", 0), None)
                if answer is not None:
                    answer.set(message)
        except (OSError, ValueError) as exc:  # a worker killed mid-message; a broken one
            log.debug("worker %d (pid %d): link ended: %s", self.index, self.pid, exc)
        finally:
            for answer in self.answers.values():
                answer.set(None)
            self.answers.clear()

    def close(self) -> None:
        self.reader.kill(block=False)
        self.sock.close()


class Links:
    """Every worker's link, the config in force (``-c``), the ports held for its rules and each
    worker's listening sockets: all on one hub, the parent's links hub. ``on_ready`` is called
    there when a worker says it accepts (the supervisor's loop is woken by it). ``single``: the
    rule of LISTEN TARGET, on the port the parent holds (without ``-c``).

    The parent makes each worker's listening sockets (SO_REUSEPORT, one per worker and rule)
    and keeps a copy: a worker that dies leaves its socket, and the clients in its queue, to
    the worker started in its place, instead of the kernel resetting them."""

    def __init__(self, on_ready: Callable[[], None], config_path: Optional[str] = None, single: Any = None):
        self.on_ready = on_ready
        self.links: Dict[int, _Link] = {}
        self.retired: Dict[str, Dict[str, Any]] = {}  # rule -> dead workers' counters, added up
        self.path = config_path
        self.single = single
        self.text: Optional[str] = None               # the config in force, as read
        self.rules: Dict[str, Any] = {}               # its rules
        self.reserved: Dict[str, Tuple[str, socket.socket]] = {}  # rule -> (listen, bound socket)
        #: per worker: rule -> (listen as the worker's rule says it, listening socket)
        self.held: Dict[int, Dict[str, Tuple[str, Any]]] = {}
        self._scraping: Any = None   # a gevent Semaphore, made on the hub
        self._reloading: Any = None

    # -- the config file ------------------------------------------------------------------

    def load(self) -> None:
        """At start: read and validate the file, bind every rule's address for the workers.
        ``ConfigError`` or ``OSError`` (naming the address); nothing is held then."""
        assert self.path is not None
        text, config = _read(self.path)
        self.reserved = self._reserve(config.rules)
        self.text, self.rules = text, config.rules

    def ports(self) -> Dict[str, int]:
        return {name: sock.getsockname()[1] for name, (_listen, sock) in self.reserved.items()}

    def _reserve(self, rules: Mapping[str, Any]) -> Dict[str, Tuple[str, socket.socket]]:
        """Each rule's port, bound (no listen) with SO_REUSEPORT; a rule whose listen did not
        change keeps the socket it had (so ``:0`` keeps its port)."""
        from gproxy._supervisor import reserve
        from gproxy.config import ConfigError, UnixAddress
        made: Dict[str, Tuple[str, socket.socket]] = {}
        try:
            for name, rule in rules.items():
                if isinstance(rule.listen, UnixAddress):
                    raise ConfigError(f"{self.path}: rule {name!r}: listen",
                                      "a Unix socket cannot be shared by --workers; use one process")
                held = self.reserved.get(name)
                if held is not None and held[0] == str(rule.listen):
                    made[name] = held
                else:
                    made[name] = (str(rule.listen), reserve(rule))
        except BaseException:
            for name, (_listen, sock) in made.items():
                if self.reserved.get(name, (None, None))[1] is not sock:
                    sock.close()
            raise
        return made

    def worker_rules(self, rules: Optional[Mapping[str, Any]] = None,
                     reserved: Optional[Mapping[str, Tuple[str, socket.socket]]] = None) -> Dict[str, Any]:
        """The rules as a worker runs them: on the port held here, with SO_REUSEPORT."""
        import dataclasses

        from gproxy.config import Address
        if self.single is not None:
            return {"": self.single}
        rules = self.rules if rules is None else rules
        reserved = self.reserved if reserved is None else reserved
        return {name: dataclasses.replace(
            rule, listen=Address(rule.listen.host, reserved[name][1].getsockname()[1]), reuse_port=True)
            for name, rule in rules.items()}

    def _listen_for(self, index: int, rules: Mapping[str, Any]):
        """Worker ``index``'s listening sockets for ``rules``: those it has for the same rule
        and address, and new ones. ``(held, made)``; OSError (nothing made is left open)."""
        from gproxy import listeners
        mine = self.held.get(index, {})
        held: Dict[str, Tuple[str, Any]] = {}
        made: List[Tuple[str, str, Any]] = []
        try:
            for name, rule in rules.items():
                spec = str(rule.listen)
                if name in mine and mine[name][0] == spec:
                    held[name] = mine[name]
                else:
                    sock = listeners.listen(rule)
                    held[name] = (spec, sock)
                    made.append((name, spec, sock))
        except BaseException:
            for _name, _spec, sock in made:
                sock.close()
            raise
        return held, made

    def release(self, index: Optional[int] = None) -> None:
        """Close the listening sockets held for worker ``index`` (default: every worker's)."""
        for i in ([index] if index is not None else list(self.held)):
            for _spec, sock in self.held.pop(i, {}).values():
                sock.close()

    def start_message(self) -> Dict[str, Any]:
        return {"op": "start", "text": self.text, "ports": self.ports()}

    def reload(self) -> None:
        """SIGHUP with ``-c``: validate the file once, here; a bad one is one ERROR line and
        changes nothing anywhere. Then bind what it adds, and have every worker apply it;
        a worker that cannot is stopped (it drains) and started again on the new file."""
        from gevent.lock import Semaphore

        from gproxy import _systemd
        from gproxy.config import ConfigError
        if self._reloading is None:
            self._reloading = Semaphore()
        with self._reloading:
            _systemd.reloading()
            made: List[Tuple[str, str, Any]] = []
            try:
                text, config = _read(str(self.path))
                reserved = self._reserve(config.rules)
                try:
                    rules = self.worker_rules(config.rules, reserved)
                    listening = {}
                    for index in list(self.links):
                        listening[index], new = self._listen_for(index, rules)
                        made.extend(new)
                except BaseException:
                    for name, (_listen, sock) in reserved.items():
                        if self.reserved.get(name, (None, None))[1] is not sock:
                            sock.close()
                    raise
            except (ConfigError, OSError) as exc:
                for _name, _spec, sock in made:
                    sock.close()
                error = getattr(exc, "strerror", None) or str(exc)
                log.error("reload failed, the running configuration stays: %s", error,
                          extra={"fields": {"event": "reload_failed", "file": self.path, "error": error}})
                _systemd.notify("READY=1")
                return
            old_reserved, old_held = self.reserved, self.held
            self.text, self.rules, self.reserved = text, config.rules, reserved
            self.held = {**old_held, **listening}
            message = self.start_message()
            message["op"] = "reload"
            asked = []
            for index, link in list(self.links.items()):
                try:
                    send_listeners(link.sock, [(name, spec, sock.fileno()) for name, (spec, sock)
                                               in listening.get(index, {}).items()
                                               if old_held.get(index, {}).get(name, (None, None))[1] is not sock])
                except OSError:
                    pass  # it has died: it starts again on what is in force now
                asked.append((link, link.ask(message)))
            failed = []
            for link, answer in asked:
                got = answer.get(timeout=RELOAD_TIMEOUT) if answer.wait(RELOAD_TIMEOUT) else None
                if got is not None and not got.get("reloaded"):
                    failed.append(link)
            for name, (_listen, sock) in old_reserved.items():
                if self.reserved.get(name, (None, None))[1] is not sock:
                    sock.close()
            for index, mine in old_held.items():
                for name, (_spec, sock) in mine.items():
                    if self.held.get(index, {}).get(name, (None, None))[1] is not sock:
                        sock.close()
            for link in failed:
                log.warning("worker %d (pid %d) could not apply the reload: it stops and starts again "
                            "on the new configuration", link.index, link.pid)
                try:
                    os.kill(link.pid, 15)
                except ProcessLookupError:
                    pass
            log.info("reloaded %s in %d worker(s)", self.path, len(asked) - len(failed))
            _systemd.notify("READY=1")

    # -- workers ---------------------------------------------------------------------------

    def attach(self, index: int, sock: socket.socket, pid: int) -> None:
        """Worker ``index`` has started: its listening sockets (those its predecessor left, or
        new ones) and the config in force go to it first."""
        link = self.links[index] = _Link(index, sock, pid, self.on_ready)
        try:
            self.held[index], _made = self._listen_for(index, self.worker_rules())
        except OSError as exc:  # it binds its own (SO_REUSEPORT); its queue dies with it then
            log.warning("worker %d: cannot make its listening sockets here: %s", index, exc.strerror or exc)
            self.release(index)
        try:
            mine = self.held.get(index, {})
            send_listeners(link.sock, [(name, spec, held.fileno()) for name, (spec, held) in mine.items()])
            link.tell(self.start_message())
        except OSError:
            pass  # it has died already: reaped soon

    def detach(self, index: int, keep: bool = False) -> None:
        """A worker has exited: fold its last snapshot's counters into the retired totals.
        ``keep``: its listening sockets wait, with their queues, for the worker started in its
        place at once; otherwise they close (the kernel resets the clients queued there)."""
        if not keep:
            self.release(index)
        link = self.links.pop(index, None)
        if link is None:
            return
        link.reader.join(ANSWER_TIMEOUT)  # a last snapshot it sent before exiting
        link.close()
        for name, data in link.last or ():
            _fold(self.retired.setdefault(name, {}), data)

    def all_ready(self, indexes: Iterable[int]) -> bool:
        return all(index in self.links and self.links[index].ready for index in indexes)

    def tell_all(self, message: Mapping[str, Any]) -> None:
        for link in list(self.links.values()):
            try:
                link.tell(message)
            except OSError:
                pass

    def collect(self) -> List[Tuple[str, _Summed]]:
        """The rules summed over every worker, live and dead: a snapshot from each (its last
        one where it has not answered within ANSWER_TIMEOUT)."""
        from gevent import Timeout
        from gevent.lock import Semaphore
        if self._scraping is None:
            self._scraping = Semaphore()
        with self._scraping:  # one reader of answers per link: scrapes take turns
            links = list(self.links.values())
            answers = [link.ask({"op": "metrics"}) for link in links]
            with Timeout(ANSWER_TIMEOUT, False):
                for answer in answers:
                    answer.wait()
            names: List[str] = []
            seen = set()
            for link in links:
                for name, _data in link.last or ():
                    if name not in seen:
                        seen.add(name)
                        names.append(name)
            if not links:
                names = list(self.retired)
            out = []
            for name in names:
                counters = Counters()
                views: Dict[str, TargetView] = {}
                if name in self.retired:
                    _add(counters, self.retired[name], views, gauges=False)
                for link in links:
                    for rule, data in link.last or ():
                        if rule == name:
                            _add(counters, data, views, gauges=True)
                counters.health = views.copy
                out.append((name, _Summed(counters)))
            return out

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        self.release()
        for _listen, sock in self.reserved.values():
            sock.close()
        self.reserved.clear()


# -- the worker's side ---------------------------------------------------------------------------


def read_start(fd: int) -> Tuple[Dict[str, Any], List[Tuple[int, str, str]]]:
    """In a worker, at its start: the parent's first messages, its listening sockets
    ``[(fd, rule, listen)]`` and the start message (``text`` and ``ports``: with ``-c``, the
    file as the parent read it, and the port it holds for each rule). Blocking, before the
    worker's hub runs anything."""
    sock = socket.socket(fileno=os.dup(fd))
    entries: List[Tuple[int, str, str]] = []
    try:
        while True:
            message = receive(sock)
            if message is None:
                raise OSError("the --workers parent has gone before it said how to start")
            if message.get("op") == "listeners":
                entries.extend(listeners_of(message))
                continue
            if message.get("op") != "start":
                raise OSError(f"the --workers parent sent {message.get('op')!r} first")
            return message, entries
    except BaseException:
        for entry in entries:
            os.close(entry[0])
        raise
    finally:
        sock.close()


def listeners_of(message: Mapping[str, Any]) -> List[Tuple[int, str, str]]:
    """A ``listeners`` message's ``[(fd, rule, listen)]``: none if fds went missing on the way
    (the kernel drops those a process has no room for): the worker binds its own then."""
    fds, entries = message["fds"], message["listeners"]
    if len(fds) != len(entries):
        log.warning("%d of %d listening sockets from the --workers parent arrived: binding them here",
                    len(fds), len(entries))
        for fd in fds:
            os.close(fd)
        return []
    return [(fd, str(name), str(spec)) for fd, (name, spec) in zip(fds, entries)]


def open_link(fd: int):
    """The worker's end as a gevent socket on this thread's hub."""
    from gevent import socket as gsocket
    return gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)


def serve(sock, handlers: Mapping[str, Callable[[dict], Optional[dict]]], writing) -> None:
    """In a worker, in a greenlet: answer the parent's requests until it goes away. Each
    handler takes the message and returns the answer's fields."""
    while True:
        try:
            message = receive(sock)
        except (OSError, ValueError):
            return
        if message is None:
            return
        handler = handlers.get(message.get("op", ""))
        if handler is None:
            for fd in message["fds"]:
                os.close(fd)
        answer = handler(message) if handler is not None else {}
        if "id" in message and answer is not None:
            try:
                with writing:
                    send(sock, {**answer, "id": message["id"]})
            except OSError:
                return
