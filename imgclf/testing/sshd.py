"""A real OpenSSH server on a loopback port, for DVC's SSH remote in tests.

Debian's ``openssh-server`` runs as the current user, with a throwaway host key and user
key made by ``ssh-keygen``, public-key login only, and SFTP (what ``dvc-ssh`` speaks).
``SshServer.home`` is a ``HOME`` for clients: no keys of the person running the tests, and
a ``.ssh/known_hosts`` pinning the host key for the ``ssh`` command. (``dvc-ssh`` does not
check host keys: sshfs, under it, turns asyncssh's check off.)
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
START_SECONDS = 20.0


class SshdMissing(RuntimeError):
    """Debian's openssh-server is not installed here."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def keygen(path: Path) -> Path:
    """An unencrypted ed25519 key pair at ``path`` and ``path.pub``."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imgclf-test", "-f", str(path)],
        check=True,
    )
    return path


class SshServer:
    """``sshd -D`` on ``127.0.0.1:<free port>`` until :meth:`stop`; started when made."""

    def __init__(self, tmp: Path) -> None:
        if not (Path(SSHD).is_file() and shutil.which("ssh-keygen")):
            raise SshdMissing(f"{SSHD} or ssh-keygen not found: apt-get install openssh-server")
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(tmp / "host_ed25519")
        self.user_key = keygen(tmp / "user_ed25519")
        (tmp / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.user = getpass.getuser()
        self.port = free_port()
        config = tmp / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                    f"PidFile {tmp / 'sshd.pid'}",
                    "UsePAM no",
                    "StrictModes no",  # the temp dir's permissions are the test's business
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # its privilege separation
        self.log_file = tmp / "sshd.log"
        self._log = self.log_file.open("wb")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config)], stdout=self._log, stderr=self._log
        )
        self._wait_listening()
        self.home = tmp / "home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        host_pub = Path(f"{self.host_key}.pub").read_text().strip()
        (self.home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"sshd not listening within {START_SECONDS} s: {self.log()}")

    def url(self, folder: Path) -> str:
        """The ``ssh://`` URL of ``folder`` on this server."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{folder}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
