"""Servers run on a free loopback port in a thread for the tests: the scoring server and the label page."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request


class ServerThread:
    """A uvicorn server in a daemon thread: `with` starts it and waits until it listens, then stops it."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def call(self, path, body=None, headers=None, raw=None, content_type="application/json"):
        """(status, JSON body) of a GET, or of a POST when there is a body."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type,
                                                                          **(headers or {})},
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


class RunningLabel(ServerThread):
    """The label page over `session`, whose items start being made first."""

    def __init__(self, session, api_key=None, agreement=None):
        from align.serving.label_app import make_server

        self.session = session
        session.start()
        super().__init__(make_server(session, "127.0.0.1", 0, api_key, agreement))

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.session.stop()

    def wait_for_item(self, annotator, seconds=120):
        deadline = time.time() + seconds
        while True:
            status, body = self.call(f"/api/next?annotator={annotator}")
            assert status == 200, body
            if body["status"] != "waiting":
                return body
            assert time.time() < deadline, f"no item after {seconds} s: {body}"
            time.sleep(0.2)
