"""The GPU session's scripts, dry-run here: bench/sanitize.py (the cases
compute-sanitizer runs) on the CPU, and bench/device_check.sh parsed by
bash. A GPU session that finds either broken loses its device budget."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sanitize_cases_run_on_the_cpu():
    proc = subprocess.run([sys.executable, os.path.join("bench", "sanitize.py"), "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sanitize:")]
    assert [line.split()[1] for line in lines] == ["persistent", "stepwise", "general", "graphed"]
    assert all(line.endswith("finite: True") for line in lines), lines


def test_device_check_parses():
    proc = subprocess.run(["bash", "-n", os.path.join("bench", "device_check.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_device_check_returns_few_files():
    """The device tool brings back at most 8 files from $OUT (every file
    below it counts): the script writes there only its archive of logs and
    results, and the goals."""
    import re
    with open(os.path.join(ROOT, "bench", "device_check.sh")) as f:
        script = f.read()
    code = [line for line in script.splitlines()
            if not line.lstrip().startswith("#") and not line.startswith('OUT="${OUT:-')]
    # every use of $OUT, with the path after it ("" where there is none)
    uses = {m for line in code for m in re.findall(r'\$\{?OUT\b\}?(/[^"\'\s;)]*)?', line)}
    assert uses == {"/logs.tgz", "/logs.tgz.tmp", "/goals.txt"}, uses
