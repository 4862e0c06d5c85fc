"""``lr_lightning.tasks`` imports without fairseq2 and exports ``TranslationTask`` on first access."""

import subprocess
import sys

import pytest
from conftest import require_translation_extra


def test_importing_the_tasks_does_not_import_fairseq2():
    code = "import sys, lr_lightning.tasks, lr_lightning.cli; print(sorted(m for m in sys.modules if 'fairseq2' in m))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_translation_task_is_exported_lazily():
    require_translation_extra()
    import lr_lightning.tasks
    import lr_lightning.tasks.translation

    assert "TranslationTask" in lr_lightning.tasks.__all__
    assert lr_lightning.tasks.TranslationTask is lr_lightning.tasks.translation.TranslationTask


def test_unknown_attributes_are_still_an_attribute_error():
    import lr_lightning.tasks

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchTask'"):
        _ = lr_lightning.tasks.NoSuchTask
