"""The compile-only target tests run in their own environment (``make test`` creates
``.venv-targets`` with the TPU and CUDA compiler packages and sets
``FUSEDLOSS_TARGETS=1``); the ordinary test run leaves them out.

The tests append what they measured (temporaries, compile times, registers) to the
file named by ``FUSEDLOSS_TARGETS_LOG``; the run's summary prints it."""

import json
import os
import tempfile

if os.environ.get("FUSEDLOSS_TARGETS") != "1":
    collect_ignore_glob = ["*.py"]


def pytest_configure(config):
    # The controller names the file before pytest-xdist starts its workers.
    if not hasattr(config, "workerinput") and "FUSEDLOSS_TARGETS_LOG" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="fusedloss-targets-", suffix=".jsonl")
        os.close(fd)
        os.environ["FUSEDLOSS_TARGETS_LOG"] = path
        config.add_cleanup(lambda: os.remove(path))


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get("FUSEDLOSS_TARGETS_LOG")
    if os.environ.get("FUSEDLOSS_TARGETS") != "1" or not path or not os.path.exists(path):
        return
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: tuple(map(str, r.values())))
    write = terminalreporter.write_line
    terminalreporter.section("compiled for the targets (not run on them)")
    for r in (r for r in rows if "temp_mib" in r):
        write(
            f"{r['target']:8} {r['impl']:8} {r['kind']:9} {r['layout']:6} {r['head']:10} "
            f"temp {r['temp_mib']:7.1f} MiB  compile {r['compile_s']:5.1f} s"
        )
    for r in (r for r in rows if "registers" in r):
        write(
            f"{r['target']:8} {r['arch']:7} {r['kernel']:28} {r['registers']:4} registers, "
            f"spills {r['spill_stores']}/{r['spill_loads']} bytes"
        )
