"""A local HTTPS static file server for a TUF repository (tests, bench and demo).

TLS with a certificate from the development CA (scripts/testbed/devca.py), single-range ``Range``
requests (``bytes=N-`` and ``bytes=N-M``, answered 206; a range past the end is 416), and
counters of what it sent, so tests can check resumption and the bench can count wire bytes.

    with TufServer(repo_dir, DevCA(pki_dir)) as srv:
        print(srv.url)           # https://localhost:PORT   (the repository's base URL)

    python -m scripts.testbed.tuf_server REPO --pki DIR [--port 8443] [--ip 10.0.2.100] [--drip-bps N]

Faults a network inflicts, on ``/targets/`` responses only (metadata is served normally):

* ``srv.cut_targets_after(n)``: the next target response is cut (connection closed) after ``n``
  bytes of its body, as a lost link does; later ones are whole again.
* ``srv.slow_drip(bps, chunk=64)``: every target response trickles ``chunk`` bytes at a time at
  ``bps`` bytes/s, each write well inside any per-read timeout (a slow-drip server);
  ``srv.slow_drip(None)`` ends it.

``ips``: extra IP addresses for the certificate (e.g. the device VM's view of the host,
``scripts.testbed.devicevm.GUEST_FWD_ADDR``), besides 127.0.0.1 and ::1.
"""
from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
import threading
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scripts.testbed.devca import DevCA

log = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("tuf_server: " + fmt, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            self.server.count(self.path, 0, 404)
            return
        size = path.stat().st_size
        start, end, status = 0, size - 1, HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if m is None:
                self.send_error(HTTPStatus.BAD_REQUEST, "only single byte ranges")
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.server.count(self.path, 0, 416)
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        target = self.path.startswith("/targets/")
        cut, (drip_bps, drip_chunk) = (self.server.take_cut(), self.server.drip) if target \
            else (None, (None, 0))
        step = drip_chunk if drip_bps else 64 * 1024
        try:
            with open(path, "rb") as f:
                f.seek(start)
                while sent < length:
                    n = min(step, length - sent)
                    if cut is not None:
                        n = min(n, cut - sent)
                        if n <= 0:
                            self.close_connection = True
                            break       # the link goes down mid-body
                    chunk = f.read(n)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    if drip_bps:
                        time.sleep(len(chunk) / drip_bps)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client went away (killed mid-download): normal here
        finally:
            self.server.count(self.path, sent, int(status), ranged=bool(rng))

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], directory: Path):
        self.directory = str(directory)
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.requests: list[tuple[str, int, int, bool]] = []  # (path, status, bytes, ranged)
        self.cut_after: int | None = None        # cut the next target response after N bytes
        self.drip: tuple[float | None, int] = (None, 0)   # (bytes/s, bytes per write)
        super().__init__(addr, lambda *a: _Handler(*a, directory=self.directory))

    def take_cut(self) -> int | None:
        with self.lock:
            cut, self.cut_after = self.cut_after, None
            return cut

    def count(self, path: str, n: int, status: int, *, ranged: bool = False) -> None:
        with self.lock:
            self.bytes_sent += n
            self.requests.append((path, status, n, ranged))

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        log.debug("tuf_server: connection from %s ended with an error", client_address)


class TufServer:
    def __init__(self, directory: Path, ca: DevCA, *, host: str = "127.0.0.1", port: int = 0,
                 name: str = "localhost", ips: tuple[str, ...] = ()):
        cert, key = ca.issue_server(name, ("127.0.0.1", "::1", *ips),
                                    out_dir=Path(ca.directory) / "tuf-server")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        self._httpd = _Server((host, port), Path(directory))
        # The handshake happens in the handler thread, so a stalled client cannot block accept().
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.port = self._httpd.server_address[1]
        self.url = f"https://{name}:{self.port}"
        self.ca_file = ca.ca_cert_path
        self._thread: threading.Thread | None = None

    @property
    def bytes_sent(self) -> int:
        return self._httpd.bytes_sent

    @property
    def requests(self) -> list[tuple[str, int, int, bool]]:
        with self._httpd.lock:
            return list(self._httpd.requests)

    def cut_targets_after(self, n: int) -> None:
        """The next ``/targets/`` response is cut after ``n`` body bytes (see the module doc)."""
        with self._httpd.lock:
            self._httpd.cut_after = n

    def slow_drip(self, bps: float | None, chunk: int = 64) -> None:
        """``/targets/`` responses trickle at ``bps`` bytes/s (None: full speed again)."""
        with self._httpd.lock:
            self._httpd.drip = (bps, chunk) if bps else (None, 0)

    def reset_counters(self) -> None:
        with self._httpd.lock:
            self._httpd.bytes_sent = 0
            self._httpd.requests.clear()

    def start(self) -> TufServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="tuf-server",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TufServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.testbed.tuf_server",
                                 description="HTTPS static server for a TUF repository")
    ap.add_argument("repo", type=Path)
    ap.add_argument("--pki", type=Path, required=True, help="dev CA directory (scripts/testbed/devca.py)")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--ip", action="append", default=[],
                    help="an extra IP address for the certificate (repeatable)")
    ap.add_argument("--drip-bps", type=float, help="slow-drip every target response at this rate")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    srv = TufServer(args.repo, DevCA(args.pki), host=args.host, port=args.port,
                    ips=tuple(args.ip)).start()
    srv.slow_drip(args.drip_bps)
    print(srv.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
