"""`matchmaker` command line: migrate, import, run, export, status, settings, verify, demo,
bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import psycopg
from pydantic import ValidationError

from core import aws
from core.api import service
from core.api.errors import InvalidInputError
from core.api.principals import Principal
from core.api.schemas import SettingsPatch, StatusOut
from core.api.status import event_status
from core.data import repository as repo
from core.data.connections import DatabaseUnavailableError, connect, resolve_database_url
from core.data.migrations import MigrationError, migrate
from core.data.repository import Conn
from core.models import EventIn, EventRecord
from core.observability import quiet_for_cli
from core.queue.worker import Matchmaker, WorkerReport
from core.settings import Settings, get_settings
from tooling import dev_tokens as devauth
from tooling.attendee_files import ImportFormatError, format_validation_error
from tooling.bench import (
    BenchOptions,
    exposure_cost,
    format_exposure_cost,
    machine_description,
    run_bench,
)
from tooling.local_runs import (
    default_event,
    describe_leftover,
    drain,
    import_and_match,
    import_file,
    leftover,
    open_database,
    recreate_event,
    verify,
)
from tooling.local_stack import READ_TIMEOUT_S, LocalStack, exposure_warning
from tooling.oracle import VerifyReport
from tooling.smoke import SmokeUsageError, run_smoke
from tooling.synthetic import generate_profiles

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
SHOWN_MISMATCHES = 10
WATCH_DEFAULT_S = 2.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"  # cursor home, clear: a terminal redraws in place

RUN_EXIT_CODES = """exit status:
  0  no user is dead; the "stopped:" line says whether the queue is drained or who still
     waits (for a retry, in a paused event, after --max-seconds) and until when
  1  users are dead (attempts used up) in some event: `matchmaker status EVENT`
  2  bad usage, or the database cannot be reached"""


# Whoever runs the CLI holds the database URL: an operator.
CLI_ADMIN = Principal("cli", "admin")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _event(conn: Conn, code: str) -> EventRecord:
    event = repo.fetch_event(conn, code)
    if event is None:
        raise CliError(f"no event with code {code!r} (import attendees into it first)")
    return event


def _print_worker_report(report: WorkerReport, out: TextIO) -> None:
    print(
        f"processed {report.completed} users in {report.batches} batches "
        f"({report.failed} failed, {len(report.dead)} dead, {report.lists_written} lists "
        f"written) in {report.elapsed_s:.2f}s",
        file=out,
    )


def _print_verify(report: VerifyReport, out: TextIO) -> None:
    print(f"verify: against the embedder {report.embedder_key}", file=out)
    if report.embedder_reason:
        print(f"  ({report.embedder_reason})", file=out)
    if report.ok:
        print(f"verify: OK - {report.checked} lists equal the brute-force top-k", file=out)
        return
    print(
        f"verify: FAILED - {len(report.mismatches)} of {report.checked} lists differ from the "
        f"brute-force top-k; {len(report.missing_vectors)} attendees without vectors, "
        f"{len(report.stale_vectors)} with stale vectors, "
        f"{len(report.asymmetric_pairs)} asymmetric pairs",
        file=out,
    )
    for mismatch in report.mismatches[:SHOWN_MISMATCHES]:
        print(
            f"  {mismatch.user_id}: expected {mismatch.expected} stored {mismatch.stored}", file=out
        )
    for label, users in (
        ("no vector", report.missing_vectors),
        ("stale vector", report.stale_vectors),
    ):
        if users:
            print(f"  {label}: {', '.join(users[:SHOWN_MISMATCHES])}", file=out)


# --- commands ----------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with connect(resolve_database_url(settings), settings) as conn:
        report = migrate(conn)
    for name in report.applied:
        print(f"applied {name}")
    print(f"{len(report.applied)} applied, {len(report.already_applied)} already applied")
    if report.drift:
        print(f"DRIFT: applied migrations edited since: {', '.join(report.drift)}", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    event = EventIn(code=args.event, name=args.name or args.event)
    with open_database(settings) as conn:
        report = import_file(conn, event, Path(args.file), settings.wake_queue_url)
    for error in report.errors:
        print(f"{args.file}: {error}", file=sys.stderr)
    print(
        f"imported {report.imported} attendees into {report.event.code}; "
        f"{len(report.errors)} rows rejected"
    )
    return EXIT_PROBLEM if report.errors else EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as conn:
        report = drain(
            conn,
            Matchmaker(settings),
            batch_size=args.batch_size,
            max_seconds=args.max_seconds,
            show_progress=not args.quiet,
        )
        left = leftover(conn)
    _print_worker_report(report, sys.stdout)
    for line in describe_leftover(left, report.stopped):
        print(line)
    return EXIT_PROBLEM if left.dead else EXIT_OK


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as conn:
        lists = repo.export_lists(conn, _event(conn, args.event).id)
    text = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in lists)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def render_status(status: StatusOut, event: EventRecord) -> str:
    """The text of `matchmaker status`: the same figures as the admin API's status."""
    q, c, x, t, e = status.queue, status.coverage, status.exposure, status.totals, status.embedder
    p = q.pending_by_priority
    ratio = f"{c.full_ratio:.1%}" if c.full_ratio is not None else "-"
    gini = f"{x.gini:.3f}" if x.gini is not None else "-"
    mean = f"{x.mean_appearances:.2f}" if x.mean_appearances is not None else "-"
    correction = x.correction + (f", m={x.hubness_m}" if x.hubness_m is not None else "")
    dlq = status.dead_letter_queue
    depth = "not readable or not configured" if dlq.depth is None else f"{dlq.depth} messages"
    retry = f" (next {q.next_retry_at.isoformat(timespec='seconds')})" if q.next_retry_at else ""
    lines = [
        f"event {event.code} ({event.name}): k={event.settings.k}, "
        f"exclude_same_company={event.settings.exclude_same_company}",
        f"  state: {status.state} - {status.state_reason}",
        f"  now: pending {q.pending} (p3={p['3']} p2={p['2']} p1={p['1']} p0={p['0']}), "
        f"running {q.running}, waiting for a retry {q.waiting_retry}{retry}, dead {q.dead}",
        f"  coverage: {c.full_lists}/{c.active} active attendees with a full list ({ratio}), "
        f"{c.short_lists_few_candidates} short (fewer candidates than k), "
        f"{c.missing_matches} missing matches, {c.without_list} without a list",
        f"  exposure ({correction}): most-listed attendee on {x.max_appearances} lists, "
        f"mean {mean}, Gini {gini}",
        f"  embedder: {e.effective or 'unavailable'} (configured {e.configured}): {e.reason}; "
        f"vectors from {e.vectors_from or '-'}",
        f"  totals: processed {t.processed}, failed {t.failed}, died {t.died}, "
        f"batches {t.batches}, lists written {t.lists_written}",
        f"  throughput: {status.throughput_per_min_5m:.1f}/min (5 min), "
        f"{status.throughput_per_min_60m:.1f}/min (60 min); last batch "
        f"{status.last_run_at.isoformat(timespec='seconds') if status.last_run_at else '-'}",
        f"  dead-letter queue ({dlq.scope}): {depth}",
    ]
    if status.last_error:
        lines.append(f"  last error ({status.last_error_at}): {status.last_error}")
    return "\n".join(lines) + "\n"


def _watch(
    snapshot: Callable[[], str], interval_s: float, out: TextIO, *, stamped: bool = True
) -> int:
    """Print snapshots until Ctrl-C: redrawn in place on a terminal, one after another
    otherwise (each after a line with its time when `stamped`; JSON lines are not)."""
    in_place = out.isatty()
    try:
        while True:
            text = snapshot()
            if in_place:
                out.write(CLEAR_SCREEN + text)
            elif stamped:
                out.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')}\n{text}")
            else:
                out.write(text)
            out.flush()
            time.sleep(interval_s)
    except KeyboardInterrupt:
        if in_place:
            out.write("\n")
        return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as conn:
        event = _event(conn, args.event)

        def snapshot() -> str:
            status = event_status(
                conn, event, settings, lambda: aws.queue_depth(settings.dead_letter_queue_url)
            )
            if args.json:
                return status.model_dump_json(indent=None if args.watch else 2) + "\n"
            text = render_status(status, event)
            for row in repo.dead_rows(conn, event.id)[:SHOWN_MISMATCHES]:
                text += (
                    f"  dead: {row['user_id']} after {row['attempts']} attempts: "
                    f"{row['last_error']}\n"
                )
            return text

        if args.watch is None:
            sys.stdout.write(snapshot())
            return EXIT_OK
        # Ctrl-C ends the watch: a background job of a script inherits "ignore SIGINT".
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return _watch(snapshot, args.watch, sys.stdout, stamped=not args.json)


def settings_patch(assignments: Sequence[str]) -> SettingsPatch:
    """`key=value` words as a SettingsPatch: values are JSON where they parse (5, false,
    2.5), else text (hubness); a dotted key sets one weight (weights.bio=2.5)."""
    body: dict[str, Any] = {}
    for word in assignments:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise CliError(f"{word!r} is not key=value (e.g. exposure_correction=hubness)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        target = body
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    try:
        return SettingsPatch.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise CliError(f"{field}: {first['msg']}") from exc


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    """Print an event's settings; with key=value words, change them first through the
    API's own operation (same validation, and the trigger re-queues the event)."""
    with open_database(settings) as conn:
        code = _event(conn, args.event).code
        if args.assignments:
            try:
                service.update_settings(
                    conn, CLI_ADMIN, code, settings_patch(args.assignments), service.no_wake
                )
            except InvalidInputError as exc:
                raise CliError(str(exc)) from exc
        event = _event(conn, code)
    print(event.settings.model_dump_json(indent=2))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    with open_database(settings) as conn:
        report = verify(conn, _event(conn, args.event), settings)
    _print_verify(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_PROBLEM


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    out = sys.stdout
    with open_database(settings) as conn:
        event = default_event(args.event, f"Demo event with {args.users} attendees")
        recreate_event(conn, event)
        t0 = time.perf_counter()
        profiles = generate_profiles(args.users, seed=args.seed, id_prefix="demo-")
        print(
            f"generated {len(profiles)} synthetic attendees in {time.perf_counter() - t0:.2f}s",
            file=out,
        )
        run = import_and_match(
            conn,
            Matchmaker(settings),
            event,
            profiles,
            batch_size=args.batch_size,
            show_progress=True,
        )
        print(
            f"imported in {run.import_s:.2f}s; matched in {run.match_s:.2f}s "
            f"(wall time for {args.users} attendees)",
            file=out,
        )
        _print_worker_report(run.report, out)
        for line in describe_leftover(leftover(conn), run.report.stopped):
            print(line, file=out)
        lists = repo.export_lists(conn, run.event.id)
        for entry in lists[: args.show]:
            print(f"\n{entry['user_id']}:", file=out)
            for match in entry["matches"]:
                print(
                    f"  #{match['rank']} {match['user_id']} score {match['score']:.3f}: "
                    f"{'; '.join(match['reasons'])}",
                    file=out,
                )
        t0 = time.perf_counter()
        report = verify(conn, run.event, settings)
        print(f"\n(verified in {time.perf_counter() - t0:.2f}s)", file=out)
    _print_verify(report, out)
    return EXIT_OK if report.ok else EXIT_PROBLEM


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.latency:
        return cmd_latency(args, settings)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    options = BenchOptions(
        seed=args.seed,
        batch_size=args.batch_size,
        verify=not args.no_verify,
        peer=not args.no_peer,
        peer_max=args.peer_max,
        exposure_correction=args.exposure_correction,
    )
    with open_database(settings):
        pass  # migrated; each size runs in its own process with its own connection
    url = resolve_database_url(settings)
    if args.exposure_cost:
        cost = exposure_cost(url, settings, args.exposure_cost, options, rounds=args.rounds)
        print(format_exposure_cost(cost))
        return EXIT_OK if cost.verified in (True, None) else EXIT_PROBLEM
    results = run_bench(url, settings, sizes, options, Path(args.json) if args.json else None)
    return EXIT_OK if all(r.verified in (True, None) for r in results) else EXIT_PROBLEM


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    """Quality against a planted truth, side by side per exposure correction mode."""
    from tooling import quality  # noqa: PLC0415 - only this command needs it

    try:
        options = quality.EvalOptions(
            sizes=_positive_ints(args.attendees, "--attendees"),
            seed=args.seed,
            joins=args.joins,
            modes=(
                [m.strip() for m in args.modes.split(",") if m.strip()]
                if args.modes
                else list(quality.MODES)
            ),
            hubness_m=args.hubness_m,
            show_progress=not args.quiet,
        )
        quality.check_modes(options.modes)
        if options.joins < 0:
            raise CliError(f"--joins: at least 0, got {options.joins}")
        with open_database(settings) as conn:
            comparisons = quality.run_eval(
                conn,
                settings,
                options,
                # Each size's table as soon as it is measured.
                on_size=lambda c: print(quality.format_comparison(c) + "\n", flush=True),
            )
    except quality.EvalError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine_description(), "eval": [asdict(c) for c in comparisons]},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return EXIT_OK


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CliError(f"{option}: a comma-separated list of whole numbers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise CliError(f"{option}: every size must be at least 2, got {text!r}")
    return values


def cmd_latency(args: argparse.Namespace, settings: Settings) -> int:
    """Join-to-match latency through HTTP against the local stack (tooling.latency)."""
    from tooling.latency import (  # noqa: PLC0415 - starts the local stack
        LatencyOptions,
        format_latency,
        run_latency_bench,
    )

    options = LatencyOptions(
        attendees=args.latency_attendees,
        steady=args.latency_joins,
        rate_per_s=args.latency_rate,
        burst=args.latency_burst,
        seed=args.seed,
    )
    print(
        f"latency: {options.attendees} attendees, {options.steady} joins at "
        f"{options.rate_per_s:g}/s, a burst of {options.burst}...",
        file=sys.stderr,
        flush=True,
    )
    report = run_latency_bench(settings, options)
    print(format_latency(report))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine_description(), "latency": asdict(report)}, indent=2)
            + "\n",
            encoding="utf-8",
        )
    return (
        EXIT_OK
        if all(p.timed_out == 0 for p in report.phases if p.name != "edit")
        else EXIT_PROBLEM
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    if warning := exposure_warning(args.host):
        print(warning, file=sys.stderr, flush=True)
    try:
        stack = LocalStack(
            settings,
            host=args.host,
            port=args.port,
            schedule_s=args.schedule_seconds,
            read_timeout_s=args.read_timeout_seconds,
        )
    except devauth.SecretFileError as exc:
        raise CliError(str(exc)) from exc
    stack.start()
    admin = devauth.mint(stack.secret, "admin", "local-admin")
    service = devauth.mint(stack.secret, "service", "local-app")
    print(f"Matchmaker API on {stack.url} (matchmaker every {args.schedule_seconds:g}s)")
    print(f"admin token:   {admin}")
    print(f"service token: {service}")
    print("attendee token: matchmaker token --role attendee --sub USER_ID")
    print(f"try: curl -H 'Authorization: Bearer {service[:12]}...' {stack.url}/events/demo")
    print("Ctrl-C stops.", flush=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    # A background job of a script inherits "ignore SIGINT": take it back.
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        stopping.wait()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping...", file=sys.stderr)
        stack.stop()
    return EXIT_OK


def cmd_smoke(args: argparse.Namespace, settings: Settings) -> int:
    service = args.token or (
        settings.service_token.get_secret_value() if settings.service_token else None
    )
    admin = args.admin_token or (
        settings.admin_token.get_secret_value() if settings.admin_token else None
    )
    if not service or not admin:
        raise CliError(
            "smoke needs a service and an admin token: --token and --admin-token, or "
            "MATCHMAKER_SERVICE_TOKEN and MATCHMAKER_ADMIN_TOKEN (`matchmaker serve` prints both)"
        )
    try:
        report = run_smoke(
            args.api_url,
            args.event,
            users=args.users,
            service_token=service,
            admin_token=admin,
            out=sys.stdout,
            timeout_s=args.timeout,
        )
    except SmokeUsageError as exc:
        raise CliError(str(exc)) from exc
    return EXIT_OK if report.ok else EXIT_PROBLEM


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    try:
        secret = devauth.load_secret()  # the one `serve` uses
    except devauth.SecretFileError as exc:
        raise CliError(str(exc)) from exc
    print(devauth.mint(secret, args.role, args.sub, ttl_s=int(args.ttl_hours * 3600)))
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matchmaker",
        description="Exact top-k matchmaking for events. Without DATABASE_URL every command "
        "uses an embedded PostgreSQL kept in MATCHMAKER_PGDATA "
        "(default ~/.local/share/matchmaker/pgdata).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    p = sub.add_parser("import", help="import attendees from .jsonl or .csv")
    p.add_argument("event", help="event code (created if missing)")
    p.add_argument("file", help="a .jsonl or .csv file (lists ';'-separated in CSV)")
    p.add_argument("--name", help="event name when the event is created")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "run",
        help="drain the matching queue locally",
        description="Match every queued user of every event until nothing is ready, then "
        "say whether the queue is drained or who still waits, and until when.",
        epilog=RUN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-size", type=int, help="users per batch (default BATCH_SIZE)")
    p.add_argument("--max-seconds", type=float, help="stop after this long")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="print each attendee's matches as JSON lines")
    p.add_argument("event")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "status",
        help="an event's state, queue, coverage and embedder (as the admin API's status)",
    )
    p.add_argument("event")
    p.add_argument("--json", action="store_true", help="the admin API's status body")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=WATCH_DEFAULT_S,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_DEFAULT_S:g}) until Ctrl-C; in place on "
        "a terminal, successive snapshots otherwise (one JSON line each with --json)",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "settings",
        help="print an event's settings; key=value words change them (as the API's PATCH)",
    )
    p.add_argument("event", help="event code")
    p.add_argument(
        "assignments",
        nargs="*",
        metavar="key=value",
        help="e.g. exposure_correction=hubness hubness_m=10 k=5 weights.bio=2.5",
    )
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("verify", help="compare stored lists with a brute-force oracle")
    p.add_argument("event")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="generate, import, match and verify a synthetic event")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--event", default="demo")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--show", type=int, default=3, help="lists to print")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="drain time vs the compute limit and a pgvector peer, per event size"
    )
    p.add_argument("--sizes", default="500,2000,10000,50000")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-verify", action="store_true", help="skip the oracle check")
    p.add_argument("--no-peer", action="store_true", help="skip the pgvector peer")
    p.add_argument(
        "--peer-max",
        type=int,
        default=2_000,
        help="above this size the peer runs on a sample of users and is extrapolated",
    )
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument(
        "--exposure-correction",
        choices=["none", "hubness"],
        default="none",
        help="the events' exposure correction",
    )
    p.add_argument(
        "--exposure-cost",
        type=int,
        metavar="N",
        help="only the from-scratch drain of N attendees under none and hubness in turns,"
        " medians and their ratio",
    )
    p.add_argument("--rounds", type=int, default=3, help="drains per setting (--exposure-cost)")
    p.add_argument(
        "--latency",
        action="store_true",
        help="only the join-to-match latency through HTTP against the local stack",
    )
    p.add_argument("--latency-attendees", type=int, default=10_000, help="event size")
    p.add_argument("--latency-joins", type=int, default=60, help="newcomers at a steady rate")
    p.add_argument("--latency-rate", type=float, default=4.0, help="joins per second")
    p.add_argument("--latency-burst", type=int, default=200, help="newcomers sent at once")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "eval",
        help="list quality against a planted truth: precision, exposure, churn per join",
        description="Generate events with a planted truth the embedder does not see, match "
        "each under every exposure correction mode (in fresh events, from scratch) and print "
        "precision@k, coverage, the Gini of appearances, the most-listed count, list churn "
        "per join and the drain time, side by side (docs/quality.md).",
    )
    p.add_argument("--attendees", default="1000,5000,20000", help="event sizes, comma-separated")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--joins", type=int, default=20, help="newcomers joined one at a time")
    p.add_argument(
        "--modes",
        help="exposure corrections to compare, comma-separated (default: none,hubness)",
    )
    p.add_argument("--hubness-m", type=int, help="the correction's m (default: the event's)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="the HTTP API, schedule and SQS on this machine")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1: never public by default; "
        "anything beyond loopback gets a warning)",
    )
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument(
        "--schedule-seconds",
        type=float,
        default=5.0,
        help="how often the matchmaker runs (triggers run it at once)",
    )
    p.add_argument(
        "--read-timeout-seconds",
        type=float,
        default=READ_TIMEOUT_S,
        help="a started request that sends nothing for this long is answered 408",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("smoke", help="end-to-end check of a running API (serve or AWS)")
    p.add_argument("--api-url", default="http://127.0.0.1:8080", help="the API's base URL")
    p.add_argument("--event", default="smoke-test", help="event code (created if missing)")
    p.add_argument("--users", type=int, default=30, help="synthetic attendees to add")
    p.add_argument("--token", help="service token (default: $MATCHMAKER_SERVICE_TOKEN)")
    p.add_argument("--admin-token", help="admin token (default: $MATCHMAKER_ADMIN_TOKEN)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for matching")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("token", help="a development token for `serve`")
    p.add_argument("--role", choices=["admin", "service", "attendee"], default="service")
    p.add_argument("--sub", default="local-app", help="subject (an attendee's user_id)")
    p.add_argument("--ttl-hours", type=float, default=168)
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_for_cli()
    try:
        settings = get_settings()
        result: int = args.func(args, settings)
        return result
    except ValidationError as exc:
        print(f"matchmaker: invalid input: {format_validation_error(exc)}", file=sys.stderr)
    except (
        CliError,
        ImportFormatError,
        MigrationError,
        DatabaseUnavailableError,
        devauth.DevExtraMissingError,  # serve and token without the dev extra (PyJWT)
        OSError,  # missing file, a directory, no permission
    ) as exc:
        print(f"matchmaker: {exc}", file=sys.stderr)
    except psycopg.OperationalError as exc:
        print(f"matchmaker: database error: {exc}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
