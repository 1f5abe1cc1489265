"""Segment's warehouse naming rules and SQL identifier validation.

Segment Warehouses name event tables and property columns with the
``go-snakecase`` package (``segmentio/go-snakecase``, ``snake.go``).
:func:`snake_case` is a line-by-line port of it, so that an event name or
property name from a Segment ``track`` call maps to the same table or column
that Segment created in the warehouse. Nested properties are flattened with
``_`` (:func:`flatten_path`).

Names that come from configuration reach SQL only after
:func:`check_identifier` has accepted them, and are then quoted.
"""

from __future__ import annotations

import re

__all__ = [
    "check_identifier",
    "flatten_path",
    "is_safe_identifier",
    "snake_case",
]

# go-snakecase works on bytes and only knows ASCII letters and digits; every
# other byte (including each byte of a multi-byte UTF-8 character) is a
# separator. Plain sets rather than str.isalpha()/isdigit(), which accept
# non-ASCII letters and digits and would therefore diverge from Segment.
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGIT = frozenset("0123456789")
_LOWER_OR_DIGIT = _LOWER | _DIGIT
_UPPER_OR_DIGIT = _UPPER | _DIGIT
_ALNUM = _LOWER | _UPPER | _DIGIT


def snake_case(name: str) -> str:
    """Convert ``name`` to snake_case exactly as Segment's go-snakecase does.

    The rules, as implemented upstream:

    * Words are runs of ``UPPER/digit`` characters followed by a run of
      ``lower/digit`` characters; they are lower-cased and joined with ``_``.
      So ``sampleText`` becomes ``sample_text`` and ``userID`` ``user_id``.
    * Every other character (space, punctuation, non-ASCII) only separates
      words and is dropped: ``Tokens Used (v2)`` becomes ``tokens_used_v2``,
      ``$something%`` becomes ``something``.
    * An upper-case run *at the start* of a name that has no lower-case
      letter before it (or none since its last ``_``) is kept together with
      the lower-case run that follows it. That is why ``HTTPRequest``
      becomes ``httprequest`` and ``CStringRef`` becomes ``cstring_ref``,
      while ``API Call Made`` becomes ``api_call_made``.
    * A name that is already lower-case, digits and single inner
      underscores is returned unchanged.

    Args:
        name: An event name or property name as sent to Segment.

    Returns:
        The snake_case name Segment uses for the warehouse table or column.
        It may be empty when ``name`` has no ASCII letter or digit.
    """
    s = name
    n = len(s)
    idx = 0
    has_lower = False
    has_underscore = False
    lowercase_since_underscore = False

    # Skip the prefix that needs no change: lower-case letters, digits, and
    # underscores that sit between two such characters.
    while idx < n:
        c = s[idx]
        if c in _LOWER:
            has_lower = True
            if has_underscore:
                lowercase_since_underscore = True
        elif c in _DIGIT:
            pass
        elif c == "_" and 0 < idx < n - 1 and s[idx + 1] in _LOWER_OR_DIGIT:
            has_underscore = True
            lowercase_since_underscore = False
        else:
            break
        idx += 1

    if idx == n:
        return s

    # Every piece appended to ``out`` is non-empty, so ``if out`` below is
    # upstream's ``len(b) > 0``.
    out: list[str] = [s[:idx]] if idx else []

    # An acronym run that begins the current word (nothing lower-case has
    # been seen in it yet) is glued to the lower-case run after it. The
    # upstream code does this once, before the general loop below, and
    # without inserting a separator.
    if s[idx] in _UPPER and (not has_lower or (has_underscore and not lowercase_since_underscore)):
        while idx < n and s[idx] in _UPPER_OR_DIGIT:
            out.append(s[idx].lower())
            idx += 1
        while idx < n and s[idx] in _LOWER_OR_DIGIT:
            out.append(s[idx])
            idx += 1

    while idx < n:
        if s[idx] not in _ALNUM:
            idx += 1
            continue
        if out:
            out.append("_")
        while idx < n and s[idx] in _UPPER_OR_DIGIT:
            out.append(s[idx].lower())
            idx += 1
        while idx < n and s[idx] in _LOWER_OR_DIGIT:
            out.append(s[idx])
            idx += 1

    return "".join(out)


def flatten_path(path: str) -> str:
    """Return the warehouse column Segment creates for a nested field.

    Segment flattens nested objects with ``_``. Each key of the dot-notation
    ``path`` is snake_cased on its own and the results are joined with
    ``_``; keys that snake_case to nothing are dropped.

    Examples: ``plan.tier`` -> ``plan_tier``,
    ``context.traits.accountId`` -> ``context_traits_account_id``,
    ``product_id.sku`` -> ``product_id_sku``.

    Args:
        path: Dot-separated property path, e.g. ``"plan.tier"``.

    Returns:
        The flattened snake_case column name.
    """
    # Per-key conversion (rather than snake-casing the whole path) keeps an
    # existing ``_`` inside a key such as ``product_id`` intact either way,
    # and matches RudderStack's documented behaviour; Segment does not
    # document the order (see the notes, open question 5).
    return "_".join(part for part in (snake_case(key) for key in path.split(".")) if part)


# Leading digits are accepted: Segment names a table after the snake-cased
# event ("2FA Enabled" -> "2fa_enabled") and only Redshift adds a "_" prefix.
# Every identifier we accept is quoted before it reaches SQL, so a leading
# digit is harmless. "$" is allowed after the first character, as in
# PostgreSQL's own unquoted identifiers. 63 is PostgreSQL's NAMEDATALEN - 1.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_$]{0,62}", re.ASCII)


def is_safe_identifier(name: str) -> bool:
    """Tell whether ``name`` may be used as a (quoted) SQL identifier.

    Accepted: 1 to 63 ASCII characters, the first a letter, digit or ``_``,
    the rest letters, digits, ``_`` or ``$``. A leading digit is allowed on
    purpose, because Segment creates such tables and columns (``2fa_enabled``)
    and the project always quotes identifiers. Anything else, including
    quotes, spaces, dots, semicolons and non-ASCII characters, is rejected.

    Args:
        name: A schema, table or column name, typically from configuration.

    Returns:
        True if the name is acceptable.
    """
    return isinstance(name, str) and _IDENTIFIER.fullmatch(name) is not None


def check_identifier(name: str, what: str) -> str:
    """Return ``name`` unchanged if it is a safe identifier, else raise.

    Args:
        name: The identifier to validate (see :func:`is_safe_identifier`).
        what: What the name is for, used in the error message
            (e.g. ``"source schema"``).

    Returns:
        ``name``.

    Raises:
        ValueError: If ``name`` is not a safe identifier.
    """
    if not is_safe_identifier(name):
        raise ValueError(f"{what}: {name!r} is not a valid SQL identifier (letters, digits and _ only, max 63 chars)")
    return name
