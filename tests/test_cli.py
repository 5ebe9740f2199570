import subprocess
import sys

from mt4ssl.cli import COMMANDS


def test_help_lists_every_command_with_one_line():
    out = subprocess.run([sys.executable, "-m", "mt4ssl", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name, (_, help_) in COMMANDS.items():
        assert name in out
        assert help_.split()[0] in out


def test_each_command_has_its_own_help():
    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "mt4ssl", name, "--help"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and f"usage: mt4ssl {name}" in r.stdout, r.stderr


def test_unknown_command_is_an_error():
    r = subprocess.run([sys.executable, "-m", "mt4ssl", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
