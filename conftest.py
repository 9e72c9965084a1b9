"""pytest configuration shared by the tests and by nbval's run of the notebooks.

nbval compares every cell's saved output with a fresh run. Text on stderr (warnings,
progress bars) depends on the machine and on timing, so it is left out of the comparison;
stdout and rich outputs are compared after the sanitizer in tests/nbval_sanitize.cfg.
"""

from __future__ import annotations

import pytest

try:
    import nbval.plugin as _nbval_plugin
except ImportError:  # nbval not installed: nothing to configure
    _nbval_plugin = None

if _nbval_plugin is not None:
    _original_transform = _nbval_plugin.transform_streams_for_comparison

    def _transform_without_stderr(outputs):
        kept = [out for out in outputs if not _is_volatile(out)]
        return _original_transform(kept)

    def _is_volatile(output) -> bool:
        if output.get("output_type") == "stream":
            return output.get("name") == "stderr"
        data = output.get("data", {})
        # A progress-bar widget's text stands in for the widget: its text is a timing.
        return "application/vnd.jupyter.widget-view+json" in data

    _nbval_plugin.transform_streams_for_comparison = _transform_without_stderr


def pytest_unconfigure(config):
    """Fail, rather than hang, when a thread the tests started is still running.

    A non-daemon thread left running keeps Python from exiting after the last test, so
    a leaked thread would otherwise show as a run that never ends. Each one gets ten
    seconds to finish; any still running are named and the process exits with status 3.
    """
    import os
    import sys
    import threading

    running = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon
    ]
    for thread in running:
        thread.join(timeout=10)
    left = [thread.name for thread in running if thread.is_alive()]
    if left:
        sys.stdout.flush()
        sys.stderr.write(
            f"pytest: {len(left)} thread(s) still running after the tests, which would keep "
            f"the process from exiting: {', '.join(left)}\n"
        )
        sys.stderr.flush()
        os._exit(3)


@pytest.fixture(scope="session")
def student_edition(tmp_path_factory):
    """The student edition, written once for the tests that read it (they never change it):
    its folder, and each student notebook with the checked exercises it holds."""
    from pearl_edu.teaching import student

    out = tmp_path_factory.mktemp("student")
    return out, student.build(out, student.ROOT)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny models in four layouts, made once for the tests that read them (never changed):
    safetensors in one file and in three shards, pickle checkpoints in one file and two."""
    import torch

    from pearl_edu.teaching.toy import make_tiny_model

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "single": make_tiny_model(root / "single"),
        "sharded": make_tiny_model(root / "sharded", shard_count=3, dtype=torch.float16),
        "bin": make_tiny_model(root / "bin", fmt="bin", shard_count=2, arch="qwen2"),
        "bin-single": make_tiny_model(root / "bin-single", fmt="bin"),
    }
