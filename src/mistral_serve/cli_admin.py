"""The `accounts`, `keys` and `usage` commands: the same database the server uses, from the command line."""

from __future__ import annotations

import argparse
from datetime import date, datetime, time, timezone
import getpass
import sys

from mistral_serve.cli_plans import add_plan_commands, existing_plan
from mistral_serve.cli_settings import open_database, print_table, settings_from, storage_flags, when


def add_admin_commands(commands) -> None:
    accounts = commands.add_parser("accounts", help="create, list, disable and enable accounts; operators; plans")
    account_commands = accounts.add_subparsers(dest="action", required=True)
    create = account_commands.add_parser("create", help="create an account")
    create.add_argument("--email", required=True)
    password = create.add_mutually_exclusive_group()
    password.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input (default: prompt for it)")
    password.add_argument("--no-password", action="store_true",
                          help="an account that cannot log in with a password: its keys are managed here")
    create.add_argument("--admin", action="store_true", help="an operator: manages every account from the dashboard")
    create.add_argument("--plan", help="its plan (default: the default plan)")
    create.set_defaults(run=run_accounts_create)
    account_commands.add_parser("list", help="list accounts").set_defaults(run=run_accounts_list)
    disable = account_commands.add_parser("disable", help="disable an account (and so all of its keys and logins)")
    disable.add_argument("--email", required=True)
    disable.add_argument("--reason", help="what its owner is told")
    disable.set_defaults(run=run_accounts_set_enabled, is_enabled=False)
    enable = account_commands.add_parser("enable", help="enable an account again")
    enable.add_argument("--email", required=True)
    enable.set_defaults(run=run_accounts_set_enabled, is_enabled=True, reason=None)
    for action, is_admin in (("promote", True), ("demote", False)):
        command = account_commands.add_parser(action, help=f"make an account {'an operator' if is_admin else 'ordinary'}")
        command.add_argument("--email", required=True)
        command.set_defaults(run=run_accounts_set_admin, is_admin=is_admin)
    set_plan = account_commands.add_parser("set-plan", help="put an account on a plan")
    set_plan.add_argument("--email", required=True)
    set_plan.add_argument("--plan", required=True, help='a plan name, or "default" for the default plan')
    set_plan.set_defaults(run=run_accounts_set_plan)

    keys = commands.add_parser("keys", help="create, list, disable, enable and delete API keys")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create = key_commands.add_parser("create", help="create a key; it is printed once, as the last line")
    create.add_argument("--email", required=True, help="the account (created, with no password, if new)")
    create.add_argument("--name", required=True, help="what the key is for")
    _ceiling_flags(create)
    create.add_argument("--attach-to-self-registered", action="store_true",
                        help="give the key to an account that someone opened by signing up (without this, refused: "
                             "whoever signed up with that email would get your key)")
    create.set_defaults(run=run_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never the secret: the prefix only)")
    listing.add_argument("--email", help="only this account's keys")
    listing.set_defaults(run=run_keys_list)
    for action in ("disable", "enable", "delete", "limit"):
        command = key_commands.add_parser(action, help={
            "disable": "disable a key; its owner cannot enable it again", "enable": "enable a key",
            "delete": "delete a key", "limit": "set the ceiling on a key (its owner may set limits below it)"}[action])
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("--prefix", help="the prefix `keys list` shows (msk-… or without msk-)")
        which.add_argument("--id", type=int, help="the id `keys list` shows")
        if action == "disable":
            command.add_argument("--reason", help="what its owner is told")
        if action == "limit":
            _ceiling_flags(command)
        command.set_defaults(run=run_keys_change, action=action)

    usage = commands.add_parser("usage", help="requests and tokens per key and model")
    usage.add_argument("--email", help="only this account's usage")
    usage.add_argument("--since", type=_day, help="from this UTC day on, YYYY-MM-DD (default: all)")
    usage.add_argument("--until", type=_day, help="up to and including this UTC day, YYYY-MM-DD")
    usage.set_defaults(run=run_usage)
    storage_flags(usage)

    for group in (account_commands, key_commands):
        for parser in group.choices.values():
            storage_flags(parser)
    add_plan_commands(commands)


def _ceiling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute at most")
    parser.add_argument("--tpm", type=int, help="tokens per minute at most")
    parser.add_argument("--token-budget", type=int, help="tokens per --budget-period at most")
    parser.add_argument("--budget-period", choices=["day", "month"])


# accounts

def run_accounts_create(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    password = None if args.no_password else _read_password(args.password_stdin)
    with open_database(settings_from(args))() as session:
        plan_id = existing_plan(session, args.plan).id if args.plan else None
        account = crud.create_account(session, args.email, password, is_admin=args.admin, plan_id=plan_id)
        print(f"created {'operator ' if args.admin else ''}account {account.email} (id {account.id})"
              + ("" if password else "; it has no password and cannot log in"))
    return 0


def _read_password(from_stdin: bool) -> str:
    from mistral_serve.security import check_new_password

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise ValueError("the passwords differ")
    else:
        raise ValueError("no terminal to ask for a password: give --password-stdin or --no-password")
    check_new_password(password)
    return password


def run_accounts_list(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    from mistral_serve.db import plans

    with open_database(settings_from(args))() as session:
        default = plans.default_plan(session)
        rows = [(account.id, account.email, "operator" if account.is_admin else "user",
                 _yes(account.is_enabled) + (f" ({account.disabled_reason})" if account.disabled_reason else ""),
                 _yes(account.password_hash is not None), "sign-up" if account.is_self_registered else "operator",
                 account.plan.name if account.plan else f"default ({default.name})" if default else "none",
                 len(account.api_keys), when(account.created_at)) for account in crud.list_accounts(session)]
    print_table(("ID", "EMAIL", "ROLE", "ENABLED", "PASSWORD", "MADE BY", "PLAN", "KEYS", "CREATED"), rows)
    return 0


def run_accounts_set_enabled(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    with open_database(settings_from(args))() as session:
        account = _existing_account(session, args.email)
        crud.set_account_enabled(session, account, args.is_enabled, args.reason)
        print(f"account {account.email} is {'enabled' if args.is_enabled else 'disabled'}")
    return 0


def run_accounts_set_admin(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    with open_database(settings_from(args))() as session:
        account = _existing_account(session, args.email)
        crud.set_account_admin(session, account, args.is_admin)
        print(f"account {account.email} is {'an operator' if args.is_admin else 'an ordinary account'}")
    return 0


def run_accounts_set_plan(args: argparse.Namespace) -> int:
    from mistral_serve.db import plans

    with open_database(settings_from(args))() as session:
        account = _existing_account(session, args.email)
        plan = None if args.plan == "default" else existing_plan(session, args.plan)
        plans.assign_plan(session, account, plan)
        print(f"account {account.email} is on " + (f"the plan {plan.name}" if plan else "the default plan"))
    return 0


# keys

def run_keys_create(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    ceiling = crud.KeyLimits(args.rpm, args.tpm, args.token_budget, args.budget_period)
    with open_database(settings_from(args))() as session:
        account = crud.get_account_by_email(session, args.email)
        if account is None:
            account = crud.create_account(session, args.email, password=None)
            print(f"created account {account.email} (id {account.id}), with no password")
        elif account.is_self_registered and not args.attach_to_self_registered:
            raise ValueError(f"the account {account.email} was opened by signing up, not by an operator: a key "
                             "made for it goes to whoever signed up with that email. If that is who you mean, give "
                             "--attach-to-self-registered")
        if not account.is_enabled:
            print(f"warning: the account {account.email} is disabled: its keys are refused until it is enabled",
                  file=sys.stderr)
        # the operator's limits are the key's ceiling: its owner may go below them, never above
        key, raw_key = crud.create_api_key(session, account, args.name, ceiling=ceiling)
        print(f"created key {key.id} msk-{key.prefix}… \"{key.name}\" for {account.email}")
        print("This is the only time the key is shown; store it now:")
        print(raw_key)
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    settings = settings_from(args)
    db = open_database(settings)
    _write_spooled_usage(settings, db)
    with db() as session:
        account = _existing_account(session, args.email) if args.email else None
        usage = {total.key_id: total for total in crud.usage_totals(
            session, account_id=account.id if account else None, by=("key",))}
        rows = [(key.id, f"msk-{key.prefix}…", key.name, key.account.email,
                 _yes(key.is_enabled) + (" (by the operator)" if key.is_operator_disabled else ""),
                 when(key.created_at), when(key.last_used_at), _limits(key),
                 usage[key.id].num_requests if key.id in usage else 0,
                 usage[key.id].total_tokens if key.id in usage else 0)
                for key in crud.list_keys(session, account)]
    print_table(("ID", "PREFIX", "NAME", "ACCOUNT", "ENABLED", "CREATED", "LAST USED", "LIMITS", "REQUESTS",
                  "TOKENS"), rows)
    return 0


def run_keys_change(args: argparse.Namespace) -> int:
    from mistral_serve.db import crud

    with open_database(settings_from(args))() as session:
        if args.id is not None:
            key = crud.get_key(session, args.id)
            if key is None:
                raise ValueError(f"no key with the id {args.id}")
        else:
            matches = crud.find_keys_by_prefix(session, args.prefix)
            if not matches:
                raise ValueError(f"no key with the prefix {args.prefix}")
            if len(matches) > 1:
                raise ValueError(f"several keys have the prefix {args.prefix} (ids "
                                 f"{', '.join(str(key.id) for key in matches)}): give --id")
            key = matches[0]
        shown = f"key {key.id} msk-{key.prefix}… \"{key.name}\""
        if args.action == "delete":
            crud.delete_key(session, key)
            print(f"deleted {shown}")
        elif args.action == "limit":
            ceiling = crud.KeyLimits(args.rpm, args.tpm, args.token_budget, args.budget_period)
            crud.set_key_ceiling(session, key, ceiling)
            print(f"{shown} may use at most: {_describe_limits(ceiling)}")
        else:
            crud.set_key_enabled_by_operator(session, key, args.action == "enable", getattr(args, "reason", None))
            print(f"{args.action}d {shown}" + (": its owner cannot enable it again" if args.action == "disable" else ""))
    return 0


def _existing_account(session, email: str):
    """The account with this email; a clear error when there is none."""
    from mistral_serve.db import crud

    account = crud.get_account_by_email(session, email)
    if account is None:
        raise ValueError(f"no account with the email {email}")
    return account


# usage

def run_usage(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from mistral_serve.db import crud

    since = datetime.combine(args.since, time(), timezone.utc) if args.since else None
    until = datetime.combine(args.until + timedelta(days=1), time(), timezone.utc) if args.until else None
    settings = settings_from(args)
    db = open_database(settings)
    _write_spooled_usage(settings, db)
    with db() as session:
        account_id = _existing_account(session, args.email).id if args.email else None
        totals = crud.usage_totals(session, account_id=account_id, since=since, until=until, by=("key", "model"))
    rows = [(_key_label(total), total.model, total.num_requests, total.num_failed_requests, total.prompt_tokens,
             total.cached_prompt_tokens, total.completion_tokens, total.total_tokens) for total in totals]
    if len(totals) > 1:
        rows.append(("all", "", *(sum(row[index] for row in rows) for index in range(2, 8))))
    print_table(("KEY", "MODEL", "REQUESTS", "FAILED", "PROMPT", "CACHED", "COMPLETION", "TOTAL"), rows)
    return 0


def _write_spooled_usage(settings, db) -> None:
    """Rows a stopped (or killed) server left on disk count too: write them first."""
    from mistral_serve.db.usage_spool import UsageSpool
    from mistral_serve.db.usage_writer import UsageWriter

    if settings.usage_spool_dir.is_dir():
        UsageWriter(db, UsageSpool(settings.usage_spool_dir)).write_pending()


def _key_label(total) -> str:
    return f"{total.key_id} {total.key_name}" if total.key_id is not None else "(deleted key)"


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text!r}") from None


def _limits(key) -> str:
    """The key's limits as `keys list` shows them: the owner's, then the operator's ceiling."""
    from mistral_serve.db.crud import KeyLimits

    owner, ceiling = KeyLimits.of(key), KeyLimits.ceiling_of(key)
    shown = [_describe_limits(owner)] if not owner.is_unlimited else []
    if not ceiling.is_unlimited:
        shown.append(f"ceiling {_describe_limits(ceiling)}")
    return "; ".join(shown) or "-"


def _describe_limits(limits) -> str:
    parts = [f"{limits.requests_per_minute} rpm" if limits.requests_per_minute else "",
             f"{limits.tokens_per_minute} tpm" if limits.tokens_per_minute else "",
             f"{limits.token_budget} tokens/{limits.budget_period}" if limits.token_budget else ""]
    return ", ".join(part for part in parts if part) or "no limit"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"

