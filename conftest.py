"""pytest configuration shared by the tests and by nbval's run of the notebooks.

nbval compares every cell's saved output with a fresh run. Text on stderr (warnings,
progress bars) depends on the machine and on timing, so it is left out of the comparison;
stdout and rich outputs are compared after the sanitizer in tests/nbval_sanitize.cfg.
"""

from __future__ import annotations

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
