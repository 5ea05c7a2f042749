"""Assertions the tests share."""
import pytest


def one_line_error(fn, *words):
    """Calls fn, which must raise a one-line ValueError containing every word; -> the message."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message
