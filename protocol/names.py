"""File and folder names as text: escaped so that any name a Linux filesystem holds can be a
cache key, a class, an input name or a line of a report, and maps back to its bytes.

WHY: a POSIX name is bytes. Python hands names that are not UTF-8 to us as strings with lone
surrogates (PEP 383: byte 0xff -> '\\udcff'); such a string cannot be encoded as UTF-8, so a
single `caf\\xe9.mp4` written by a Latin-1 tool stopped a whole preprocess run (the
fingerprint, the cache index and the report all encode to UTF-8). Rejecting those samples
would throw good data away, so names are escaped instead, the way `ls --quoting-style=escape`
does:

    byte that is not UTF-8      \\xHH       (b"bad_\\xff" -> "bad_\\xff")
    control character           \\xHH       (a newline in a name cannot forge report lines)
    backslash                   \\\\         (so the escape is one-to-one)
    anything else               itself     (valid UTF-8 names without a backslash or control
                                           character are unchanged, so existing keys stay)

`escape_name` is one-to-one and `unescape_name` inverts it (to the name's bytes: open it with
`os.fsdecode` or as bytes). `printable` is for messages only: it escapes what cannot be printed
but leaves backslashes alone, so it can be applied to text that is already escaped.

A file's stem also names a model input (`imu.data` -> input `imu`), and input names follow
the stricter MODALITY_NAME rule of the sample schema (ASCII letters, digits, `_ . -`, at most
64, not starting with a digit). `modality_name` maps any stem onto that rule (`imu\xff` ->
`imu_xff`, `2d scan` -> `_2d_x20scan`); a stem that already follows it is unchanged. Two
stems that map to one name are caught by the dataset index like any two files of one stem.
"""
from __future__ import annotations

import hashlib
import os
import re

#: What a modality (model input) may be called: the rule protocol/schema.py enforces.
MODALITY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_NAME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

_NEEDS_ESCAPE = re.compile("[\\\\\x00-\x1f\x7f\udc80-\udcff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def _hex(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o - 0xDC00 if 0xDC80 <= o <= 0xDCFF else o:02x}"


def escape_name(name: str | bytes) -> str:
    """A name (str from os.listdir/scandir, or bytes) as UTF-8-safe text; see the module doc."""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not _NEEDS_ESCAPE.search(name):
        return name
    return _NEEDS_ESCAPE.sub(lambda m: "\\\\" if m.group() == "\\" else _hex(m.group()), name)


def unescape_name(text: str) -> bytes:
    """The bytes of the name that `escape_name` turned into `text`. ValueError on a lone or
    unknown backslash escape (text that escape_name cannot have made)."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        plain = text[pos:m.start()]
        if "\\" in plain:
            raise ValueError(f"{text!r}: a backslash must start \\\\ or \\xHH")
        out += plain.encode("utf-8")
        esc = m.group(1)
        out += b"\\" if esc == "\\" else bytes([int(esc[1:], 16)])
        pos = m.end()
    rest = text[pos:]
    if "\\" in rest:
        raise ValueError(f"{text!r}: a backslash must start \\\\ or \\xHH")
    out += rest.encode("utf-8")
    return bytes(out)


def printable(text: str) -> str:
    """`text` with undecodable bytes (lone surrogates) and control characters as \\xHH, for
    a report or a log line; backslashes are kept, so already escaped text stays as it is."""
    if not _UNPRINTABLE.search(text):
        return text
    return _UNPRINTABLE.sub(lambda m: _hex(m.group()), text)


def modality_name(stem: str | bytes) -> str:
    """A file stem as a valid input name (MODALITY_NAME); see the module doc."""
    if isinstance(stem, str) and MODALITY_NAME.match(stem):
        return stem
    raw = os.fsencode(stem)
    name = "".join(chr(b) if b in _NAME_BYTES else f"_x{b:02x}" for b in raw)
    if not name or not (name[0].isalpha() or name[0] == "_"):
        name = "_" + name
    if len(name) > 64:
        name = name[:47] + "_" + hashlib.blake2b(raw, digest_size=8).hexdigest()
    return name


__all__ = ["MODALITY_NAME", "escape_name", "modality_name", "printable", "unescape_name"]
