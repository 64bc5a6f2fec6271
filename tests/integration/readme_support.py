"""Reading README.md for tests/integration/test_readme.py: its ```sh blocks as shell words, its
Commands table as usages, and what the product's own argparse parsers make of them.

Pure functions: no process, no network. Shell words are read as bash reads them (quotes,
``$'...'``, ``NAME=VALUE`` prefixes, a trailing ``&``, ``# comments``); nothing is expanded, and a
command substitution is refused rather than guessed at.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from homenet.cli.hnctl import _parser as hnctl_parser
from homenet.cli.main import _parser as homenet_parser

README = Path(__file__).resolve().parents[2] / "README.md"
PARSERS = {"homenet": homenet_parser, "hnctl": hnctl_parser}


# -- reading README.md -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """One line of a ```sh block of README.md."""

    number: int
    text: str
    #: The comment line that opens the line's paragraph ("" if the paragraph has none).
    section: str
    #: The heading the block sits under.
    heading: str

    def __str__(self) -> str:
        return f"README.md:{self.number}: {self.text.strip()}"


def sh_blocks(markdown: str) -> list[list[Line]]:
    """The ```sh fenced blocks, line by line, each line knowing its paragraph's opening comment."""
    blocks: list[list[Line]] = []
    block: list[Line] | None = None
    heading = section = ""
    paragraph_start = True
    for number, raw in enumerate(markdown.splitlines(), 1):
        text = raw.strip()
        if block is None:
            if text.startswith("#"):
                heading = text.lstrip("#").strip()
            elif text == "```sh":
                block, section, paragraph_start = [], "", True
            continue
        if text.startswith("```"):
            blocks.append(block)
            block = None
        elif not text:
            section, paragraph_start = "", True
        else:
            if paragraph_start and text.startswith("#"):
                section = text.lstrip("#").strip()
            paragraph_start = False
            block.append(Line(number, raw, section, heading))
    return blocks


def split_comment(text: str) -> tuple[str, str]:
    """``code  # comment`` -> (code, comment), quotes respected as sh does (``$'..'`` included)."""
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote != "'":
                i += 1
            elif c == quote[-1]:
                quote = ""
        elif c == "\\":
            i += 1
        elif c == "'" and text[i - 1 : i] == "$":
            quote = "$'"  # ANSI-C quoting: backslash escapes inside
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i], text[i + 1 :].strip()
        i += 1
    return text, ""


_ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'")
_ANSI_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "e": "\x1b", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def _ansi_c(body: str) -> str:
    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc.startswith("x"):
            return chr(int(esc[1:], 16))
        return _ANSI_ESCAPES.get(esc, "\\" + esc)

    return re.sub(r"\\(x[0-9A-Fa-f]{1,2}|.)", one, body)


def words(code: str) -> list[str]:
    """The shell words of one command (quotes and ``$'...'`` as bash reads them; nothing expanded)."""
    if "$(" in code or "`" in code:
        raise ValueError(f"command substitution in {code.strip()!r}: the test cannot follow it")
    return shlex.split(_ANSI_C.sub(lambda m: shlex.quote(_ansi_c(m.group(1))), code))


_ENV_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


@dataclass(frozen=True)
class Command:
    """A README command line: ``NAME=VALUE... PROGRAM ARGS... [> FILE] [&]  [# comment]``."""

    line: Line
    env: dict[str, str]
    argv: list[str]
    background: bool
    comment: str
    #: ``> FILE``: where the command's stdout goes.
    stdout_to: str | None = None


def command(line: Line) -> Command | None:
    """The command on ``line``, or None for a comment-only line."""
    code, comment = split_comment(line.text)
    argv = words(code)
    if not argv:
        return None
    background = argv[-1] == "&"
    if background:
        argv.pop()
    stdout_to = None
    if len(argv) >= 2 and argv[-2] == ">":
        stdout_to = argv.pop()
        argv.pop()
    env: dict[str, str] = {}
    while argv and _ENV_WORD.fullmatch(argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    assert argv, f"{line}: environment assignments and no command"
    return Command(line, env, argv, background, comment, stdout_to)


def proxy_commands(argv: list[str]) -> list[str]:
    """The ProxyCommand values of an ``ssh`` command line."""
    out = []
    for i, word in enumerate(argv):
        option = word[2:] if word.startswith("-o") and len(word) > 2 else ""
        if word == "-o" and i + 1 < len(argv):
            option = argv[i + 1]
        name, sep, value = option.partition("=")
        if sep and name.lower() == "proxycommand":
            out.append(value)
    return out


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def cli_lines() -> list[tuple[Line, list[str]]]:
    """Every homenet/hnctl command of the sh blocks, as (README line, argv)."""
    out = []
    for block in sh_blocks(readme_text()):
        for line in block:
            cmd = command(line)
            if cmd is None:
                continue
            if cmd.argv[0] in PARSERS:
                out.append((line, cmd.argv))
            elif cmd.argv[0] == "ssh":
                out += [(line, words(proxy)) for proxy in proxy_commands(cmd.argv)]
    return out


def use_it_lines() -> list[Line]:
    """The lines of the "Use it" block the flow runs or checks: commands, and comments that show
    a program's output (``#   READY ...``, ``#   LISTENING ...``)."""
    blocks = [b for b in sh_blocks(readme_text()) if b and b[0].heading == "Use it"]
    assert len(blocks) == 1, f"README.md: expected one sh block under '## Use it', found {len(blocks)}"
    return [line for line in blocks[0] if command(line) is not None or output_comment(line) is not None]


def output_comment(line: Line) -> str | None:
    """The output a comment-only line shows (``#   READY hn://...``), if it shows one."""
    code, comment = split_comment(line.text)
    if code.strip() or not re.match(r"(READY|LISTENING|PUBLISHED) ", comment):
        return None
    return comment


# -- the product's parsers ---------------------------------------------------------------------------
class ParseFailed(Exception):
    """argparse refused a command line; the message is what it printed."""


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` (program first) parsed by the product's own parser, as the console script would."""
    parser = PARSERS[argv[0]]()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv[1:])
        except SystemExit as exc:
            raise ParseFailed(err.getvalue().strip() or f"exit {exc.code}") from None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _sample(action: argparse.Action, placeholder: str) -> str:
    """A value the action accepts, for a placeholder such as ``N`` or ``ADDR``."""
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type in (int, float):
        return "1"
    return placeholder


# -- the Commands table ------------------------------------------------------------------------------
def table_rows() -> list[tuple[int, list[str]]]:
    """The Commands table: (README line number, the code spans of the row's first cell)."""
    rows = []
    in_table = False
    for number, raw in enumerate(readme_text().splitlines(), 1):
        if raw.startswith("#"):
            in_table = raw.strip() == "### Commands"
        elif in_table and raw.startswith("|"):
            cells = re.split(r"(?<!\\)\|", raw)
            spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`]*)`", cells[1])]
            if spans:
                rows.append((number, spans))
    return rows


@dataclass
class _Item:
    """A usage token, or a bracketed optional group (``[--flag VALUE]``, ``...`` = repeatable)."""

    words: list[str]
    optional: bool = False
    repeat: bool = False


def _items(usage: str) -> list[_Item]:
    items: list[_Item] = []
    group: _Item | None = None
    for word in usage.split():
        if group is None and word.startswith("["):
            group = _Item([], optional=True)
            word = word[1:]
        if group is None:
            items.append(_Item([word]))
            continue
        end = re.search(r"\](\.\.\.)?$", word)
        if end:
            group.words.append(word[: end.start()])
            group.repeat = bool(end.group(1))
            items.append(group)
            group = None
        else:
            group.words.append(word)
    assert group is None, f"unclosed [ in {usage!r}"
    return items


def usage_argv(usage: str, where: str) -> tuple[list[str], dict[str, int]]:
    """An argv that uses everything a table usage shows, checked against the parsers on the way;
    with, for each repeatable flag, the dest that must then hold that many values."""
    items = _items(usage)
    program = items.pop(0).words[0]
    assert program in PARSERS, f"{where}: {program!r} is neither homenet nor hnctl"
    parser, path = PARSERS[program](), program
    argv, repeats = [program], {}
    chosen = False
    while items:
        item = items.pop(0)
        head = item.words[0]
        if head.startswith("-"):
            action = _options(parser).get(head)
            assert action is not None, f"{where}: `{path}` has no flag {head}"
            given = item.words[1:] if item.optional else []
            takes_value = action.nargs != 0
            if not item.optional and takes_value:
                assert items, f"{where}: {head} needs a value"
                assert not items[0].words[0].startswith("-"), f"{where}: {head} needs a value"
                given = items.pop(0).words
            shown = f"{head} {' '.join(given)}".strip()
            assert takes_value == bool(given), f"{where}: the README shows `{shown}`, but {path} {head} " + (
                "takes a value" if takes_value else "takes no value"
            )
            times = 2 if item.repeat else 1
            argv += [head, *[_sample(action, v) for v in given]] * times
            if item.repeat:
                repeats[action.dest] = 2
        elif _subcommands(parser) and not chosen:
            subs = _subcommands(parser)
            assert head in subs, f"{where}: `{path}` has no subcommand {head!r} (it has {sorted(subs)})"
            parser, path = subs[head], f"{path} {head}"
            chosen = not _subcommands(parser)
            argv.append(head)
        else:
            assert not item.optional, f"{where}: optional positional {item.words} is not checked"
            argv += item.words
    return argv, repeats


def _subcommand_index(usage: list[str], where: str) -> int:
    """Where the subcommand is in a usage: after the program's own options (and their values)."""
    options = _options(PARSERS[usage[0]]())
    i = 1
    while i < len(usage) and usage[i].startswith("-"):
        action = options.get(usage[i])
        assert action is not None, f"{where}: `{usage[0]}` has no flag {usage[i]}"
        i += 1 + (action.nargs != 0)
    return i


def table_cases() -> list[tuple[int, str]]:
    """(line, full usage) per usage a table row shows: ``a\\|b`` alternatives are expanded, and
    a span that does not start with a program continues the previous one (``kick ID``)."""
    cases = []
    for number, spans in table_rows():
        prefix = ""
        for span in spans:
            words_ = span.split()
            if words_[0] in PARSERS:  # the program and its options: the prefix of continuation spans
                prefix = " ".join(words_[: _subcommand_index(words_, f"README.md:{number}")])
            else:
                assert prefix, f"README.md:{number}: `{span}` follows no homenet/hnctl usage"
                span, words_ = f"{prefix} {span}", f"{prefix} {span}".split()
            alternatives = [(i, w.split("|")) for i, w in enumerate(words_) if "|" in w and not w.startswith("[")]
            if not alternatives:
                cases.append((number, span))
                continue
            assert len(alternatives) == 1, f"README.md:{number}: `{span}`: one a|b|c choice per usage, please"
            [(at, choices)] = alternatives
            cases += [(number, " ".join([*words_[:at], c, *words_[at + 1 :]])) for c in choices]
    return cases


def substitute(text: str, subs: Mapping[str, str]) -> str:
    """Replace the README's words with the flow's (longest first, one pass: no re-substitution)."""
    if not subs:
        return text
    keys = sorted(subs, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, keys)), lambda m: subs[m.group(0)], text)


_PLACEHOLDER = re.compile(r"([A-Za-z0-9_-]+:)?SECRET|[A-Za-z0-9_-]*\.\.\.")


def expectation(text: str) -> tuple[re.Pattern[str], list[tuple[str, str]]]:
    """A README output text as a pattern: ``SECRET`` and ``word...`` are placeholders, captured;
    with the placeholders (and the literal prefix each capture gets) in order."""
    parts: list[str] = []
    names: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[pos : m.start()]))
        group = f"p{len(names)}"
        if m.group(0).endswith("SECRET"):
            prefix = m.group(1) or ""
            parts.append(re.escape(prefix) + f"(?P<{group}>[A-Za-z0-9_-]{{22,128}})")
        else:
            prefix = ""
            parts.append(f"(?P<{group}>[^\\s/]+)")
        names.append((m.group(0), prefix))
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    return re.compile("".join(parts)), names


def promised_output(comment: str) -> str | None:
    """What a line's comment says the command prints (``prints: X``, ``prints X once``, or an output
    line such as ``LISTENING hn://...``)."""
    m = re.search(r"\bprints:?\s+(.+?)(?:\s+once)?$", comment)
    if m:
        return m.group(1)
    if re.match(r"(READY|LISTENING|PUBLISHED) ", comment):
        return comment
    return None
