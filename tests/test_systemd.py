"""systemd/: the unit passes `systemd-analyze verify` and keeps its settings and hardening."""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD_DIR / "sendd.service"
EXEC_PATH = "/opt/sendd/.venv/bin/sendd"

SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": f"{EXEC_PATH} run --config /etc/sendd/sendd.toml",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "2",
    "TimeoutStopSec": "45",  # above daemon.stop_timeout's default of 30 s
    "KillSignal": "SIGTERM",
    "User": "sendd",
    "Group": "sendd",
    "RuntimeDirectory": "sendd",
    "RuntimeDirectoryMode": "0750",
    "UMask": "0027",
    "LimitNOFILE": "65536",
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
}

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed "
                                          "(scripts/setup.sh installs Debian's systemd package)")


def read_unit(text: str) -> configparser.ConfigParser:
    # Units may repeat keys (strict=False keeps the last), keep "$" and "%" literal, and are
    # case-sensitive (optionxform=str).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


@pytest.mark.parametrize(("key", "value"), [*SERVICE.items(), *HARDENING.items()])
def test_service_setting(key: str, value: str) -> None:
    service = read_unit(UNIT.read_text())["Service"]
    assert key in service, f"{key}= is missing from [Service]"
    assert service[key] == value


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify fails when ExecStart's program does not exist, and /opt/sendd is only there once
    # installed. So verify a copy whose ExecStart names a stub executable in tmp_path; only
    # that path differs (test_service_setting pins the real one). `--root=` would also
    # satisfy the check, but then every unit and command is looked up inside that root too
    # (sysinit.target, /bin/kill), which would need a copy of systemd's own units there.
    stub = tmp_path / "bin" / "sendd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={EXEC_PATH} ") == 1
    copy = tmp_path / "sendd.service"
    copy.write_text(text.replace(f"ExecStart={EXEC_PATH} ", f"ExecStart={stub} "))

    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=120)

    output = result.stdout + result.stderr
    # Unknown keys and unparsable values are only warnings ("..., ignoring.") with exit 0.
    assert "Unknown" not in output, output
    assert "ignoring" not in output, output
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "sendd" in line] == []


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed (Debian's systemd package)")
def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD_DIR / "sendd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    users = (tmp_path / "etc" / "passwd").read_text().splitlines()
    assert [line.split(":")[4] for line in users if line.startswith("sendd:")] == [
        "sendd send daemon"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-tmpfiles is not installed (Debian's systemd package)")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to chown")
def test_tmpfiles_protect_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD_DIR / "sendd.sysusers")],
                   check=True, capture_output=True, timeout=60)
    group = next(line for line in (tmp_path / "etc" / "group").read_text().splitlines()
                 if line.startswith("sendd:"))
    gid = int(group.split(":")[2])
    config = tmp_path / "etc" / "sendd" / "sendd.toml"
    config.parent.mkdir(mode=0o777)
    config.write_text("")
    config.chmod(0o666)

    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                    str(SYSTEMD_DIR / "sendd.tmpfiles")], check=True, capture_output=True,
                   timeout=60)

    for path, mode in [(config.parent, 0o750), (config, 0o640)]:
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, 0, gid), path
