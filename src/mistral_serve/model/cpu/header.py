"""kernels.h → ctypes: the kernels' structures and function prototypes, read from the one header that
kernels.c is compiled against, so that no C declaration is restated by hand in Python.

The header keeps to a small subset of C that this module parses: `typedef struct { <type> <name>; ... }
Name;` and `MS_API <type> ms_<name>(<type> <name>, ...);`, with the scalar types below, pointers to them
or to a declared structure, and `void`. Anything else raises HeaderError when the module is imported.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
import re

SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "void": None}
# what a pointer may point to (a tensor's data, or a string for `char`)
POINTEES = {"void", "char", "uint8_t", "int8_t", "uint16_t", "int32_t", "int64_t", "float"}
_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_STRUCT = re.compile(r"typedef\s+struct\s*\{(?P<body>[^}]*)\}\s*(?P<name>\w+)\s*;")
_FUNCTION = re.compile(r"MS_API\s+(?P<result>[\w\s*]+?)\s*\b(?P<name>ms_\w+)\s*\((?P<params>[^)]*)\)\s*;")
_DECLARATION = re.compile(r"^(?P<type>[\w\s]+?)\s*(?P<pointer>\*?)\s*(?P<name>\w+)$")


class HeaderError(ValueError):
    """kernels.h has a form this module does not parse."""


@dataclass(frozen=True)
class Function:
    name: str
    restype: type | None
    argtypes: tuple[type, ...]


@dataclass(frozen=True)
class Header:
    structs: dict[str, type[ctypes.Structure]]
    functions: dict[str, Function]


def read_header(path: Path) -> Header:
    text = _COMMENT.sub(" ", path.read_text())
    structs: dict[str, type[ctypes.Structure]] = {}
    for match in _STRUCT.finditer(text):
        fields = [_declaration(field, structs) for field in match["body"].split(";") if field.strip()]
        structs[match["name"]] = type(match["name"], (ctypes.Structure,), {"_fields_": fields})
    functions = {}
    for match in _FUNCTION.finditer(text):
        params = [p.strip() for p in match["params"].split(",")]
        declared = [] if params == ["void"] else [_declaration(p, structs) for p in params]
        functions[match["name"]] = Function(match["name"], _type(match["result"], structs),
                                            tuple(argtype for _, argtype in declared))
    if not structs or not functions:
        raise HeaderError(f"{path.name} declares no structure or no function in the form this parser reads")
    return Header(structs, functions)


def _declaration(text: str, structs: dict[str, type]) -> tuple[str, type]:
    """`const uint16_t *x` → ("x", c_void_p)."""
    match = _DECLARATION.match(" ".join(text.split()))
    if match is None:
        raise HeaderError(f"cannot read the declaration {text.strip()!r}")
    return match["name"], _type(match["type"] + match["pointer"], structs)


def _type(text: str, structs: dict[str, type]) -> type | None:
    """`const uint16_t *` → c_void_p; `int64_t` → c_int64; `DecoderShape *` → POINTER(DecoderShape)."""
    words = [word for word in text.replace("*", " * ").split() if word != "const"]
    is_pointer = words[-1:] == ["*"]
    base = words[0] if len(words) == 1 + is_pointer else None
    if base in structs:
        return ctypes.POINTER(structs[base]) if is_pointer else structs[base]
    if is_pointer and base in POINTEES:
        return ctypes.c_char_p if base == "char" else ctypes.c_void_p
    if not is_pointer and base in SCALARS:
        return SCALARS[base]
    raise HeaderError(f"the type {text.strip()!r} is not one this parser maps")
