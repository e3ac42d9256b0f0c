"""The web app's pure helpers: the download's Content-Disposition and the link's QR code."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
import segno

from p2pmega.web.server import content_disposition, qr_svg


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ("report.pdf", "report.pdf"),
        ("Bericht für März.txt", "Bericht f_r M_rz.txt"),
        ('say "hi"\\.txt', "say _hi__.txt"),
        ("日本語.bin", "___.bin"),
    ],
)
def test_content_disposition_names_the_file_in_utf8_with_an_ascii_fallback(
    name: str, fallback: str
) -> None:
    header = content_disposition(name)
    match = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'([!-~]+)', header)
    assert match is not None, header
    assert match.group(1) == fallback
    assert unquote(match.group(2)) == name
    assert ";" not in match.group(2)
    assert " " not in match.group(2)


def test_qr_svg_draws_the_link_and_refuses_one_too_long() -> None:
    link = "magnet:?xt=urn:p2pmega:" + "a" * 52 + "&x.key=" + "B" * 43 + "&dn=x.bin"
    svg = qr_svg(link).decode()
    assert svg.startswith("<svg")
    assert "<script" not in svg
    # The same symbol segno encodes for the link: same size, so the whole link fits at medium error correction.
    size = segno.make(link, error="m", micro=False).symbol_size(scale=4, border=4)
    assert f'width="{size[0]}"' in svg
    with pytest.raises(ValueError, match="too long for a QR code"):
        qr_svg("magnet:?xt=urn:p2pmega:" + "x" * 8000)
