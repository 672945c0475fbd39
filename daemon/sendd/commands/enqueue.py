"""`sendd enqueue`: stream a recipients file into PostgreSQL with COPY.

The file is read in chunks and each chunk is copied inside one transaction, so a
1,000,000-line file never needs 1,000,000 rows in memory and a file that turns out to be
malformed half-way stores nothing at all.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import phonenumbers

from sendd.core.segments import count_segments
from sendd.errors import UserError

CHUNK_ROWS = 10_000
REJECTED_SAMPLE_SIZE = 5
TRANSACTIONAL_PRIORITY = 10
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters a recipients line may hold; also the csv module's field limit, so no field can
# exceed that, and a file without newlines is refused instead of read whole into memory.
MAX_LINE = 128 * 1024
AT_EXAMPLE = "2026-12-01T09:00:00+02:00"
E164_SHAPE = re.compile(r"\+[1-9][0-9]{6,14}")  # + and 7 to 15 digits, as migration 0008
COPY_COLUMNS = [
    "tenant_id", "campaign_id", "account", "sender", "recipient", "body", "priority", "segments",
]


@dataclass
class EnqueueRequest:
    tenant: str
    text: str
    account: str
    sender: str
    recipients: TextIO
    source_name: str
    name: str | None = None
    at: datetime | None = None
    transactional: bool = False


@dataclass
class EnqueueResult:
    campaign_id: int | None = None
    queued: int = 0
    rejected: int = 0
    rejected_sample: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "campaign_id": self.campaign_id,
            "queued": self.queued,
            "rejected": self.rejected,
            "rejected_sample": self.rejected_sample,
        }


def normalize_number(raw: str) -> str | None:
    """The E.164 form of a valid number, None when it is not one."""
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    number = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    # The database fails any other shape (sendd.recipient_valid): reject it here instead.
    return number if E164_SHAPE.fullmatch(number) else None


def parse_at(value: str, now: datetime | None = None) -> datetime:
    """The time `--at` names: ISO 8601 with a UTC offset (or Z), and still ahead. A time
    without a zone, an empty value (an unset shell variable) and a past time are refused: each
    would otherwise send at a moment nobody chose."""
    if not value.strip():
        raise UserError(f"--at: empty; give a time like {AT_EXAMPLE}, or --now to send at once")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UserError(f"--at: not a time like {AT_EXAMPLE}: {value!r}") from None
    if parsed.tzinfo is None:
        raise UserError(f"--at: {value!r} has no time zone; add its UTC offset, like "
                        f"{AT_EXAMPLE} (or Z for UTC)")
    try:
        parsed.astimezone(UTC)  # PostgreSQL stores it in UTC
    except OverflowError:
        raise UserError(f"--at: {value} is after the year 9999") from None
    if parsed <= (now or datetime.now(UTC)):
        raise UserError(f"--at: {value} is in the past; to send at once, say --now instead")
    return parsed


def read_recipients(
    stream: TextIO, source_name: str, placeholders: set[str]
) -> Iterator[tuple[int, str, dict[str, str]]]:
    """(line number, raw phone, columns) per recipient line, CSV or one number a line."""
    lines = _numbered_lines(stream, source_name)
    first = next(lines, None)
    if first is None:
        return
    first_no, first_line = first
    header = _csv_fields(first_line, source_name, first_no)
    columns = [c.strip().lower() for c in header]
    if "phone" not in columns:
        _check_placeholders(placeholders, {"phone"}, source_name)
        yield from _plain_lines([(first_no, first_line)], source_name)
        yield from _plain_lines(lines, source_name)
        return
    _check_placeholders(placeholders, set(columns), source_name)
    yield from _csv_rows(lines, columns, source_name)


def open_recipients(path: str) -> contextlib.AbstractContextManager[TextIO]:
    """The recipients file (or stdin for "-") for read_recipients.

    Bytes that are not UTF-8 are decoded as lone surrogates (surrogateescape) and refused line
    by line, because a strict decoder fails on the chunk it reads ahead, so it cannot say which
    line is bad. utf-8-sig: a CSV saved by a spreadsheet starts with a byte order mark."""
    options: dict[str, Any] = {"encoding": "utf-8-sig", "errors": "surrogateescape",
                               "newline": ""}
    if path == "-":
        return contextlib.nullcontext(io.TextIOWrapper(sys.stdin.buffer, **options))
    try:
        return open(path, **options)  # noqa: SIM115 -- a context manager
    except OSError as error:
        raise UserError(f"--recipients: cannot read {path}: {error.strerror}") from None


def _numbered_lines(stream: TextIO, source_name: str) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        # Room for "\r\n" after MAX_LINE characters: a longer line comes back cut, too long.
        while line := stream.readline(MAX_LINE + 2):
            number += 1
            if len(line) > MAX_LINE or "\x00" in line or not (line.isascii() or _utf8(line)):
                _refuse_line(line, source_name, number)
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                yield number, stripped
    except UnicodeDecodeError:  # a stream opened without surrogateescape
        raise UserError(f"{source_name}: after line {number}: not UTF-8 text") from None


def _utf8(line: str) -> bool:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # surrogateescape's stand-ins for bytes that were not UTF-8
        return False
    return True


def _refuse_line(line: str, source_name: str, number: int) -> None:
    """Raise for a line that is binary, too long or not UTF-8 (a line just over MAX_LINE may
    be none of these: its end of line is not counted)."""
    if "\x00" in line:
        problem = "binary data, not a text file"
    elif len(line.rstrip("\r\n")) > MAX_LINE:
        problem = f"longer than {MAX_LINE:,} characters"
    elif not _utf8(line):
        problem = "not UTF-8 text"
    else:
        return
    raise UserError(f"{source_name}: line {number}: {problem}")


def _plain_lines(lines: Iterable[tuple[int, str]], source_name: str) -> Iterator:
    for number, line in lines:
        if "," in line or ";" in line:
            raise UserError(
                f"{source_name}: line {number}: several fields on a line; a CSV file needs a "
                "header row with a 'phone' column"
            )
        yield number, line, {"phone": line}


def _csv_rows(lines: Iterable[tuple[int, str]], columns: list[str], source_name: str) -> Iterator:
    for number, line in lines:
        values = _csv_fields(line, source_name, number)
        if len(values) != len(columns):
            raise UserError(
                f"{source_name}: line {number}: {len(values)} fields, the header has {len(columns)}"
            )
        row = {c: v.strip() for c, v in zip(columns, values, strict=True)}
        yield number, row["phone"], row


def _csv_fields(line: str, source_name: str, number: int) -> list[str]:
    try:
        return next(csv.reader([line]))
    except csv.Error as error:  # MAX_LINE keeps fields within the limit; this is a safety net
        raise UserError(f"{source_name}: line {number}: not a CSV row: {error}") from None


def _check_placeholders(placeholders: set[str], columns: set[str], source_name: str) -> None:
    missing = sorted(placeholders - columns)
    if missing:
        raise UserError(
            f"--text uses {{{missing[0]}}} but {source_name} has no such column "
            f"(columns: {', '.join(sorted(columns))})"
        )


def render(text: str, row: dict[str, str]) -> str:
    """TEXT with its {placeholders} filled from the row."""
    return PLACEHOLDER.sub(lambda m: row[m.group(1).lower()], text)


def placeholders_in(text: str) -> set[str]:
    return {name.lower() for name in PLACEHOLDER.findall(text)}


async def enqueue(
    conn: Any, request: EnqueueRequest, progress: TextIO | None = None
) -> EnqueueResult:
    """Validate and COPY every recipient in one transaction; returns the counts."""
    result = EnqueueResult()
    async with conn.transaction():
        await _check_tenant(conn, request.tenant)
        if not request.transactional:
            result.campaign_id = await _create_campaign(conn, request)
        rows: list[tuple] = []
        placeholders = placeholders_in(request.text)
        lines = read_recipients(request.recipients, request.source_name, placeholders)
        for number, raw, row in lines:
            recipient = normalize_number(raw)
            if recipient is None:
                _reject(result, number, raw)
                continue
            rows.append(_message_row(request, result.campaign_id, recipient, row))
            if len(rows) >= CHUNK_ROWS:
                await _copy(conn, rows, result, progress)
        await _copy(conn, rows, result, progress)
        if result.queued == 0:
            raise UserError(
                f"{request.source_name}: no valid recipients ({result.rejected} rejected"
                + (f", e.g. {result.rejected_sample[0]}" if result.rejected_sample else "")
                + "); nothing was queued"
            )
    return result


def _reject(result: EnqueueResult, line_number: int, raw: str) -> None:
    result.rejected += 1
    if len(result.rejected_sample) < REJECTED_SAMPLE_SIZE:
        result.rejected_sample.append(f"line {line_number}: {raw[:40]}")


def _message_row(
    request: EnqueueRequest, campaign_id: int | None, recipient: str, row: dict
) -> tuple:
    body = render(request.text, {**row, "phone": recipient})
    priority = TRANSACTIONAL_PRIORITY if request.transactional else 0
    return (
        request.tenant, campaign_id, request.account, request.sender, recipient, body,
        priority, count_segments(body),
    )


async def _copy(
    conn: Any, rows: list[tuple], result: EnqueueResult, progress: TextIO | None
) -> None:
    if not rows:
        return
    await conn.copy_records_to_table(
        "message", schema_name="sendd", columns=COPY_COLUMNS, records=rows
    )
    result.queued += len(rows)
    rows.clear()
    if progress is not None:
        progress.write(f"\rqueued {result.queued:,}, rejected {result.rejected:,}")
        progress.flush()


async def _check_tenant(conn: Any, tenant: str) -> None:
    if await conn.fetchval("SELECT 1 FROM sendd.tenant WHERE id = $1", tenant) is None:
        raise UserError(
            f"unknown tenant {tenant!r}: create it first with "
            f"`sendd tenant set {tenant} --credits N`"
        )


async def _create_campaign(conn: Any, request: EnqueueRequest) -> int:
    scheduled = request.at is not None and request.at > datetime.now(UTC)
    return await conn.fetchval(
        """INSERT INTO sendd.campaign (tenant_id, name, status, scheduled_at, started_at)
           VALUES ($1, $2, $3, $4, CASE WHEN $3 = 'sending' THEN now() END) RETURNING id""",
        request.tenant,
        request.name,
        "scheduled" if scheduled else "sending",
        request.at,
    )


def progress_stream() -> TextIO | None:
    """stderr when a person is watching, else nothing (keeps logs and pipes clean)."""
    return sys.stderr if sys.stderr.isatty() else None
