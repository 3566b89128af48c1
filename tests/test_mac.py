import pytest

from bootserver.errors import BadRequest
from bootserver.mac import canonical_mac, hyphenated


@pytest.mark.parametrize("text", ["52:54:00:AB:cd:01", "52-54-00-ab-cd-01", "525400abcd01", "5254.00ab.cd01",
                                  " 52:54:00:ab:cd:01\n"])
def test_common_forms_are_canonical(text):
    assert canonical_mac(text) == "52:54:00:ab:cd:01"
    assert hyphenated(canonical_mac(text)) == "52-54-00-ab-cd-01"


@pytest.mark.parametrize("text", ["", "zz", "12", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02:03", "../../etc",
                                  "1234567890123", "52:54:00:ab:cd:0g"])
def test_malformed_is_refused_with_the_input_named(text):
    with pytest.raises(BadRequest) as info:
        canonical_mac(text)
    assert repr(text.strip()) in str(info.value) or repr(text) in str(info.value)
