"""The review server stops after review_idle_minutes of quiet, but never
while it is answering: an answer that takes longer than the idle time (the
map of a large collection; the executable's first import of scikit-learn
on a busy machine) is sent, and quiet counts from then.  A real server on
127.0.0.1, served in a thread."""

import threading
import time

from conftest import rs


def serving(idle_s: float):
    server = rs.ReviewServer(None, 0, idle_s)
    why = []
    thread = threading.Thread(target=lambda: why.append(server.serve()))
    thread.start()
    return server, thread, why


def test_quiet_stops_it():
    server, thread, why = serving(0.3)
    thread.join(timeout=10)
    assert not thread.is_alive() and why == ["idle"]


def test_a_long_answer_is_not_quiet():
    server, thread, why = serving(0.3)
    with server.answering():
        time.sleep(1.5)  # five idle times: the server must still be up
        assert thread.is_alive()
    answered = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive() and why == ["idle"]
    assert time.monotonic() - answered >= 0.25  # quiet counted from the answer
