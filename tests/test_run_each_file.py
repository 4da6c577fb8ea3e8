"""tests/run_each_file.py: every file in a process of its own (forked from a preloaded parent, or a
new interpreter), results in the files' order, a file that leans on another file's import fails."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import run_each_file  # noqa: E402


@pytest.fixture
def files(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: long\n")
    sources = {
        "test_a_sets_state.py": "import sys\nsys.modules['shared_by_a'] = object()\n\ndef test_a():\n    pass\n",
        # passes only when test_a's module was imported first, as in one pytest process
        "test_b_needs_a.py": "import sys\n\ndef test_b():\n    assert 'shared_by_a' in sys.modules\n",
        "test_c_fails.py": "def test_c():\n    assert 1 + 1 == 3\n",
        "test_d_slow.py": "import time\n\ndef test_d():\n    time.sleep(60)\n",
        "test_e_marked.py": "import pytest\n\n@pytest.mark.slow\ndef test_e():\n    pass\n",
    }
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    return [tmp_path / name for name in sources]


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "new-interpreter"])
def test_each_file_alone_in_order(files, fork):
    got = list(run_each_file.run_all(list(files), ["-p", "no:cacheprovider", "-m", "not slow"],
                                     jobs=2, timeout=8, fork=fork))
    assert [path for path, _, _ in got] == files
    status = {path.name: (s, summary) for path, s, summary in got}
    assert status["test_a_sets_state.py"][0] == "pass"
    assert status["test_b_needs_a.py"][0] == "fail" and "test_b_needs_a.py::test_b" in status["test_b_needs_a.py"][1]
    assert status["test_c_fails.py"][0] == "fail" and "test_c" in status["test_c_fails.py"][1]
    assert status["test_d_slow.py"][0] == "fail" and "timed out" in status["test_d_slow.py"][1]
    assert status["test_e_marked.py"][0] == "empty"


def test_one_process_would_hide_the_dependency(files):
    # the reason for the runner: together, a then b passes
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(files[0]),
                          str(files[1])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
