"""The hosting of a hub (gproxy._hubthread): a thread of its own, calls from other OS threads,
and no caller left waiting for a hub that has ended. This process is not patched."""

from __future__ import annotations

import threading

import gevent
import gevent.event
import pytest

from gproxy import _hubthread
from gproxy._hubthread import HubEnded, HubHost
from peers import TIMEOUT


@pytest.fixture
def host():
    """A host serving nothing in a thread of its own, ended (and joined) after the test."""
    host = HubHost()
    host.start_in_thread(lambda: None, name=lambda: "gproxy test host", at_exit=lambda: None)
    yield host
    host.stop(host.end)
    assert not host.thread.is_alive()


def test_a_call_from_another_thread_runs_on_the_hosts_hub_and_returns_or_raises(host):
    def where():
        return threading.get_ident(), gevent.get_hub()
    assert host.call(where) == (host.thread_id, host.hub)
    with pytest.raises(KeyError, match="mine"):
        host.call({}.__getitem__, "mine")
    # on the hub's own thread it is a plain call, not a hand-over to itself
    assert host.call(host.call, where) == (host.thread_id, host.hub)


def test_a_call_queued_when_the_owner_ends_the_host_never_runs_and_its_caller_is_told(host):
    entered, gate = threading.Event(), threading.Lock()
    gate.acquire()
    ran = []

    def hold_the_hub_then_end():
        entered.set()
        gate.acquire()  # a real lock: the whole hub waits, so what is handed over stays queued
        host.end()

    holding = host.submit(hold_the_hub_then_end)
    assert entered.wait(TIMEOUT)
    queued = host.submit(ran.append, "ran")
    gate.release()
    with pytest.raises(HubEnded) as ended:
        queued.result()
    assert ended.value.began is False
    assert holding.result() is None
    assert host.join() and ran == []
    with pytest.raises(HubEnded):  # and nothing is handed over any more
        host.call(ran.append, "late")
    assert ran == []


def test_a_call_running_when_the_hosts_thread_ends_raises_instead_of_waiting_for_ever(host, monkeypatch):
    monkeypatch.setattr(_hubthread, "_CALLS_GRACE", 0.05)
    entered = threading.Event()

    def outlives_the_host():
        entered.set()
        gevent.sleep(3600)  # sleep-ok: a call that never finishes by itself

    running = host.submit(outlives_the_host)
    assert entered.wait(TIMEOUT)
    assert host.stop(host.end) is True
    with pytest.raises(HubEnded) as ended:
        running.result()
    assert ended.value.began is True


def test_a_running_call_may_finish_after_the_owner_ended_the_host(host, monkeypatch):
    """A second stop() racing the first one ends after it: it is let finish, not lost."""
    monkeypatch.setattr(_hubthread, "_CALLS_GRACE", TIMEOUT)  # about the finishing, not the time
    entered, gate = threading.Event(), gevent.event.Event()

    def finishes_after_the_end():
        entered.set()
        gate.wait()  # yields to the hub meanwhile: its thread could end
        return "finished"

    running = host.submit(finishes_after_the_end)
    assert entered.wait(TIMEOUT)
    host.call(host.end)
    host.hub.loop.run_callback_threadsafe(gate.set)
    assert running.result() == "finished"


def test_a_failed_start_is_raised_to_the_caller_and_leaves_no_thread():
    host = HubHost()
    before = threading.active_count()
    with pytest.raises(OSError, match="no such port"):
        host.start_in_thread(_raise(OSError("no such port")), name=lambda: "gproxy failing",
                             at_exit=lambda: None)
    assert threading.active_count() == before and not host.thread.is_alive()
    with pytest.raises(HubEnded):
        host.call(lambda: None)


def test_the_thread_is_renamed_once_started():
    names = iter(["gproxy 127.0.0.1:0", "gproxy 127.0.0.1:8080"])
    host = HubHost()
    host.start_in_thread(lambda: None, name=lambda: next(names), at_exit=lambda: None)
    try:
        assert host.thread.name == "gproxy 127.0.0.1:8080"
    finally:
        host.stop(host.end)


def _raise(exc):
    def start():
        raise exc
    return start



def test_a_host_whose_start_failed_here_serves_calls_once_started_again():
    """A service retries a forwarder that could not listen (start_here again): calls from other
    threads must then reach its hub, not run on the caller's thread."""
    from gproxy import _gevent
    host, ready, failed, finished = HubHost(), threading.Event(), [], gevent.event.Event()

    def program_thread():  # a thread that runs its own hub, as the CLI's main thread does
        hub = gevent.get_hub()
        try:
            host.start_here(_raise(OSError("address in use")))
        except OSError as exc:
            failed.append(exc)
        host.start_here(lambda: None)
        keepalive = hub.loop.async_()  # so the loop runs what other threads hand over
        keepalive.start(lambda: None)
        ready.set()
        finished.wait()
        keepalive.close()
        _gevent.destroy_hub(hub)

    thread = threading.Thread(target=program_thread, daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT) and len(failed) == 1
    assert host.call(threading.get_ident) == thread.ident
    host.call(host.end)
    host.hub.loop.run_callback_threadsafe(finished.set)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
