"""Free text never reaches an SCPI instrument as more than one command (issue 15's injection:
`DISP:TEXT 'x';VOLT 1000;OUTP 1;*RST;''` and `DISP:TEXT 'x\\nVOLT 1000'`)."""

from __future__ import annotations

import pytest

from labmesh.drivers.scpi import ScpiTemplate
from labmesh.drivers.visa import scpi_quoted, scpi_text
from labmesh.protocol.errors import ParameterValueError

pytestmark = pytest.mark.unit

FILL = ScpiTemplate().fill


def test_quoted_text_has_its_quote_doubled_so_it_stays_one_string():
    assert FILL("DISP:TEXT '{value}'", "x';VOLT 1000;OUTP 1;*RST;'") == (
        "DISP:TEXT 'x'';VOLT 1000;OUTP 1;*RST;'''"
    )
    assert FILL('DISP:TEXT "{value}"', 'say "hi"; ok') == 'DISP:TEXT "say ""hi""; ok"'
    assert FILL("DISP:TEXT '{value}'", "plain text, 20 C") == "DISP:TEXT 'plain text, 20 C'"


@pytest.mark.parametrize("text", ["x\nVOLT 1000", "x\rOUTP 1", "bell\x07", "tab\there", "\x7f"])
def test_control_characters_are_refused_even_quoted(text):
    with pytest.raises(ParameterValueError, match="control character"):
        FILL("DISP:TEXT '{value}'", text)


@pytest.mark.parametrize(
    "text", ["x;VOLT 1000", "CURR,1", "a b", "x'", 'x"', "#15hello", "x\nVOLT 1000", ""]
)
def test_unquoted_text_must_be_a_plain_mnemonic(text):
    if text == "":
        assert FILL("FUNC {value}", text) == "FUNC "  # nothing to inject
        return
    with pytest.raises(ParameterValueError, match="cannot be sent unquoted"):
        FILL("FUNC {value}", text)


def test_mnemonics_numbers_and_booleans_pass_as_before():
    assert FILL("FUNC {value}", "VOLT:DC") == "FUNC VOLT:DC"
    assert FILL("VOLT {value}", 1.25) == "VOLT 1.25"
    assert FILL("VOLT {value:.3f}", 5) == "VOLT 5.000"
    assert FILL("OUTP {value}", True) == "OUTP 1"
    assert scpi_text("DBM") == "DBM" and scpi_text(1e-9) == "1e-09"
    assert scpi_quoted("it's", "'") == "it''s"
