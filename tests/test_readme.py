"""The README's quickstart is exactly two commands, and CI runs the second one verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    install_and_run, test = quickstart_commands()
    assert "ap-erase train" in install_and_run and "pip install" in install_and_run
    assert "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_config_reference_is_up_to_date():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_config_doc.py"), "--check"])
    assert proc.returncode == 0, "docs/CONFIG.md is stale: run python tools/gen_config_doc.py"
