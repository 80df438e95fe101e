"""Error messages and categories."""

from __future__ import annotations

import pytest

from medgn.errors import (
    InputDataError,
    LockedError,
    MedgnError,
    ModelError,
    ResourceError,
    UsageError,
)


@pytest.mark.parametrize(
    ("cls", "code"),
    [(UsageError, 2), (InputDataError, 3), (ModelError, 4), (ResourceError, 5), (LockedError, 6)],
)
def test_category_codes(cls: type[MedgnError], code: int) -> None:
    assert cls("x", "bad").code == code


def test_one_line_names_where_got_expected() -> None:
    err = InputDataError("a/b.nii.gz", "spacing must be positive", got="(0.0, 1.0, 1.0)", expected="> 0")
    assert err.one_line() == "a/b.nii.gz: spacing must be positive (got (0.0, 1.0, 1.0), expected > 0)"


def test_multiline_detail_collapses_to_one_line() -> None:
    err = UsageError("k", "first\nsecond")
    assert "\n" not in err.one_line()


def test_control_characters_in_names_are_escaped_not_printed() -> None:
    from medgn.errors import InputDataError, printable

    assert printable("a\nb\x1b[31mc\udce9") == "a\\nb\\x1b[31mc\\udce9"
    assert printable("café ünïcode") == "café ünïcode"
    err = InputDataError("dir/bad\nname\r.nii.gz", "cannot read", got="line one\nline two")
    assert err.one_line() == "dir/bad\\nname\\r.nii.gz: cannot read (got line one line two)"


def test_brief_cuts_a_library_message_at_a_word_and_keeps_it_on_one_line() -> None:
    from medgn.errors import brief

    message = "File is missing DICOM File Meta Information header or the 'DICM' prefix is missing. Use force=True"
    assert brief(message, 200) == message
    cut = brief(message, 60)
    assert len(cut) <= 60 and cut.endswith(" ...") and message.startswith(cut[:-4])
    assert cut[:-4].split()[-1] in message.split()  # the last word kept is a whole word
    assert brief("a\nb\tc") == "a b c"
    assert brief("x" * 300, 50) == "x" * 46 + " ..."
