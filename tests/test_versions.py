"""Code versions change with what code does, not with its comments, docstrings or layout."""
from __future__ import annotations

import importlib
import textwrap

import pytest

from flows.stages import Stage, code_fingerprint

STEP = '''\
"""Drop short documents."""
LIMIT = 200


def keep(doc):
    """True when the document is long enough."""
    return len(doc["text"]) >= LIMIT
'''

# the same code: comments added, docstrings edited or removed, reformatted
SAME = '''\
# a comment at the top
"""Drop documents that are too short (a rewritten docstring)."""
LIMIT = 200  # characters


def keep(  doc ):
    # a comment in the body
    return (len(doc["text"])
            >= LIMIT)
'''


def test_comments_docstrings_and_layout_do_not_change_the_fingerprint():
    assert code_fingerprint(SAME) == code_fingerprint(STEP)
    assert code_fingerprint(STEP.replace("LIMIT = 200", "LIMIT = 201")) != code_fingerprint(STEP)
    assert code_fingerprint(STEP.replace(">=", ">")) != code_fingerprint(STEP)
    # a string that is not a docstring is code
    with_string = STEP.replace('    return', '    print("checking")\n    return')
    assert code_fingerprint(with_string) != code_fingerprint(STEP)


def build(ctx):
    """A build function: its own source is part of the version too."""
    return {}


def test_a_comment_edit_keeps_the_stage_version_and_a_code_edit_changes_it(tmp_path, monkeypatch):
    module = tmp_path / "c2m_test_step.py"
    module.write_text(STEP)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    importlib.import_module("c2m_test_step")
    stage = Stage("step", (), (), ("c2m_test_step",), build)
    before = stage.code_version()
    module.write_text(SAME)
    assert stage.code_version() == before
    module.write_text(textwrap.dedent(STEP).replace("LIMIT = 200", "LIMIT = 100"))
    assert stage.code_version() != before


def test_a_parse_spoiled_by_another_thread_is_retried(monkeypatch):
    """CPython 3.11's "AST constructor recursion depth mismatch" (a parse racing another
    thread's) is transient: the fingerprint parses again, and gives up only if it persists."""
    import ast

    from flows import stages

    real, calls = ast.parse, []

    # only this test's source fails: the patched ast.parse is every caller's (pytest's too)
    def flaky(source, *args, **kwargs):
        if source != "x = 1\n":
            return real(source, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=57, after=76)")
        return real(source, *args, **kwargs)
    monkeypatch.setattr(stages.ast, "parse", flaky)
    assert stages.code_fingerprint("x = 1\n") == stages.ast.dump(real("x = 1\n"), annotate_fields=False,
                                                                 include_attributes=False)
    assert len(calls) == 2

    def broken(source, *args, **kwargs):
        if source != "x = 1\n":
            return real(source, *args, **kwargs)
        raise SystemError("AST constructor recursion depth mismatch")
    monkeypatch.setattr(stages.ast, "parse", broken)
    with pytest.raises(SystemError):
        stages.code_fingerprint("x = 1\n")
