"""Words for identities: `describe(spec)` and its exact inverse `parse(text)`.

Form: "{a|an} {color1} {category} with {color2} {pattern words}, {width} {height} {taper} body,
with {parts}", e.g. "a red mug with blue stripes, wide tall straight body, with handle and lid".
Parts read "no extras" when none, "x", "x and y" or "x, y and z" otherwise (underscores in part
names become spaces). Parsing is case-insensitive, ignores a trailing period and a leading
"a photo of ", and raises ValueError naming the first token it cannot read.
"""
from __future__ import annotations

from nearid.synth.spec import (CATEGORY_PARTS, PALETTE, PATTERN_PHRASES, SHAPE_LEVELS, SHAPE_WORDS,
                               IdentitySpec)

PHOTO_PREFIX = "a photo of "
NO_PARTS = "no extras"
_PHRASE_TO_PATTERN = {phrase: name for name, phrase in PATTERN_PHRASES.items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _part_words(part: str) -> str:
    return part.replace("_", " ")


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe(spec: IdentitySpec) -> str:
    """Natural-language description that names every attribute of `spec`."""
    shape_words = " ".join(words[levels.index(v)]
                           for v, levels, words in zip(spec.shape, SHAPE_LEVELS, SHAPE_WORDS))
    parts = _join([_part_words(p) for p in spec.parts]) or NO_PARTS
    return (f"{_article(spec.color1)} {spec.color1} {spec.category} with {spec.color2} "
            f"{PATTERN_PHRASES[spec.pattern]}, {shape_words} body, with {parts}")


def prompt_for(spec: IdentitySpec) -> str:
    """The generation/positive prompt: 'a photo of ' + description."""
    return PHOTO_PREFIX + describe(spec)


class _Tokens:
    """A cursor over the words and commas of a description, for error messages naming tokens."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.items = text.replace(",", " , ").split()
        self.pos = 0

    def next(self, what: str) -> str:
        if self.pos >= len(self.items):
            raise ValueError(f"parse: expected {what} but the description ended: {self.text!r}")
        token = self.items[self.pos]
        self.pos += 1
        return token

    def expect(self, word: str) -> None:
        token = self.next(repr(word))
        if token != word:
            raise ValueError(f"parse: expected {word!r} but found token {token!r} in {self.text!r}")

    def until_comma(self, what: str) -> str:
        words = []
        while self.pos < len(self.items) and self.items[self.pos] != ",":
            words.append(self.items[self.pos])
            self.pos += 1
        if not words:
            raise ValueError(f"parse: expected {what} in {self.text!r}")
        return " ".join(words)

    def rest(self) -> list[str]:
        out, self.pos = self.items[self.pos:], len(self.items)
        return out


def _lookup(token: str, table, what: str, text: str):
    if token not in table:
        raise ValueError(f"parse: unknown {what} {token!r} in {text!r}; known: {sorted(table)}")
    return table[token] if isinstance(table, dict) else token


def _parse_parts(words: list[str], category: str, text: str) -> tuple[str, ...]:
    if " ".join(words) == NO_PARTS:
        return ()
    known = {_part_words(p): p for p in CATEGORY_PARTS[category]}
    groups, current = [], []
    for w in words + [","]:
        if w in (",", "and"):
            if not current:
                raise ValueError(f"parse: empty part name before token {w!r} in {text!r}")
            groups.append(" ".join(current))
            current = []
        else:
            current.append(w)
    parts = [_lookup(g, known, f"{category} part", text) for g in groups]
    if len(set(parts)) != len(parts):
        raise ValueError(f"parse: repeated part in {groups} in {text!r}")
    return tuple(p for p in CATEGORY_PARTS[category] if p in parts)


def parse(text: str) -> IdentitySpec:
    """Inverse of `describe`; raises ValueError naming the first unreadable token."""
    if not isinstance(text, str):
        raise ValueError(f"parse: expected a string, got {type(text).__name__}")
    clean = " ".join(text.strip().lower().split()).rstrip(".")
    if clean.startswith(PHOTO_PREFIX):
        clean = clean[len(PHOTO_PREFIX):]
    tokens = _Tokens(clean)
    article = tokens.next("an article")
    if article not in ("a", "an"):
        raise ValueError(f"parse: expected 'a' or 'an' but found token {article!r} in {clean!r}")
    color1 = _lookup(tokens.next("a colour"), PALETTE.keys(), "colour", clean)
    category = _lookup(tokens.next("a category"), CATEGORY_PARTS.keys(), "category", clean)
    tokens.expect("with")
    color2 = _lookup(tokens.next("a colour"), PALETTE.keys(), "colour", clean)
    pattern = _lookup(tokens.until_comma("a pattern"), _PHRASE_TO_PATTERN, "pattern", clean)
    tokens.expect(",")
    shape = []
    for levels, words, what in zip(SHAPE_LEVELS, SHAPE_WORDS, ("width", "height", "taper")):
        word = _lookup(tokens.next(f"a {what} word"), dict(zip(words, levels)), f"{what} word", clean)
        shape.append(word)
    tokens.expect("body")
    tokens.expect(",")
    tokens.expect("with")
    parts = _parse_parts(tokens.rest(), category, clean)
    try:
        return IdentitySpec(category, tuple(shape), color1, color2, pattern, parts)
    except ValueError as e:
        raise ValueError(f"parse: {e} in {clean!r}") from None
