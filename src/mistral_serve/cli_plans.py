"""The `plans` and `invites` commands: the operator's ceilings on accounts, and invitations to sign up."""

from __future__ import annotations

import argparse
from datetime import timedelta

from mistral_serve.cli_settings import open_database, print_table, settings_from, storage_flags, when

# flag → PlanLimits field
_PLAN_FLAGS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "concurrent": "max_concurrent_requests",
               "tokens_per_day": "tokens_per_day", "tokens_per_month": "tokens_per_month", "max_keys": "max_keys",
               "max_n": "max_n", "max_output_tokens": "max_output_tokens"}


def add_plan_commands(commands) -> None:
    plans = commands.add_parser("plans", help="the ceilings operators set for accounts")
    plan_commands = plans.add_subparsers(dest="action", required=True)
    for action in ("create", "update"):
        command = plan_commands.add_parser(action, help=f"{action} a plan" + (
            ": the limits given replace those it had, the others stay" if action == "update" else ""))
        command.add_argument("name")
        _plan_flags(command)
        command.add_argument("--default", action="store_true", help="the plan of every account assigned none")
        command.set_defaults(run=run_plans_save)
    plan_commands.add_parser("list", help="list plans").set_defaults(run=run_plans_list)
    delete = plan_commands.add_parser("delete", help="delete a plan: its accounts go to the default plan")
    delete.add_argument("name")
    delete.set_defaults(run=run_plans_delete)
    default = plan_commands.add_parser("set-default", help='make a plan the default, or "none" for no default')
    default.add_argument("name")
    default.set_defaults(run=run_plans_set_default)

    invites = commands.add_parser("invites", help="invitations to sign up (for --signup invite)")
    invite_commands = invites.add_subparsers(dest="action", required=True)
    create = invite_commands.add_parser("create", help="make an invitation; its code is printed once, last")
    create.add_argument("--plan", help="the new account's plan (default: the default plan)")
    create.add_argument("--note", help="who it is for")
    create.add_argument("--expires-in-days", type=float, default=7.0, help="default 7")
    create.set_defaults(run=run_invites_create)
    invite_commands.add_parser("list", help="list invitations (never their codes)").set_defaults(run=run_invites_list)
    for group in (plan_commands, invite_commands):
        for parser in group.choices.values():
            storage_flags(parser)


def _plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute, all the account's keys together")
    parser.add_argument("--tpm", type=int, help="tokens per minute, all the account's keys together")
    parser.add_argument("--concurrent", type=int, help="requests in flight at once")
    parser.add_argument("--tokens-per-day", type=int, help="tokens per UTC day")
    parser.add_argument("--tokens-per-month", type=int, help="tokens per calendar month")
    parser.add_argument("--max-keys", type=int, help="API keys the account may have")
    parser.add_argument("--max-n", type=int, help="choices per request")
    parser.add_argument("--max-output-tokens", type=int, help="max_tokens per choice")
    parser.add_argument("--models", help="comma-separated model ids it may use (default: every served model)")
    parser.add_argument("--no-limit", action="append", default=[], metavar="LIMIT",
                        choices=[flag.replace("_", "-") for flag in _PLAN_FLAGS] + ["models"],
                        help="(update) drop this limit; repeatable")


def existing_plan(session, name: str):
    from mistral_serve.db import plans

    plan = plans.get_plan(session, name)
    if plan is None:
        names = [plan.name for plan in plans.list_plans(session)]
        raise ValueError(f"no plan named {name!r}" + (f" (plans: {', '.join(names)})" if names else
                                                      " (there are none: `mistral-serve plans create`)"))
    return plan


def run_plans_save(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mistral_serve.db import plans
    from mistral_serve.db.plans import PlanLimits

    with open_database(settings_from(args))() as session:
        plan = existing_plan(session, args.name) if args.action == "update" else None
        values = asdict(PlanLimits.of(plan)) if plan else {}
        values.update({field: getattr(args, flag) for flag, field in _PLAN_FLAGS.items()
                       if getattr(args, flag) is not None})
        if args.models is not None:
            values["models"] = tuple(model.strip() for model in args.models.split(",") if model.strip())
        for flag in args.no_limit:
            values[_PLAN_FLAGS.get(flag.replace("-", "_"), flag)] = None
        limits = PlanLimits(**values)
        if plan is None:
            plan = plans.create_plan(session, args.name, limits, is_default=args.default)
        else:
            plans.update_plan(session, plan, limits)
            if args.default:
                plans.set_default_plan(session, plan)
        print(f"plan {plan.name}{' (default)' if plan.is_default else ''}: {limits.describe()}")
    return 0


def run_plans_list(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from mistral_serve.db import plans
    from mistral_serve.db.models import Account
    from mistral_serve.db.plans import PlanLimits

    with open_database(settings_from(args))() as session:
        num_accounts = dict(session.execute(select(Account.plan_id, func.count()).group_by(Account.plan_id)).all())
        rows = [(plan.name, "yes" if plan.is_default else "", num_accounts.get(plan.id, 0),
                 PlanLimits.of(plan).describe()) for plan in plans.list_plans(session)]
    print_table(("PLAN", "DEFAULT", "ACCOUNTS", "LIMITS"), rows)
    return 0


def run_plans_delete(args: argparse.Namespace) -> int:
    from mistral_serve.db import plans

    with open_database(settings_from(args))() as session:
        plans.delete_plan(session, existing_plan(session, args.name))
        print(f"deleted plan {args.name}; its accounts are on the default plan")
    return 0


def run_plans_set_default(args: argparse.Namespace) -> int:
    from mistral_serve.db import plans

    with open_database(settings_from(args))() as session:
        plan = None if args.name == "none" else existing_plan(session, args.name)
        plans.set_default_plan(session, plan)
        print(f"the default plan is {plan.name}" if plan else "there is no default plan: accounts assigned none "
                                                              "have no ceiling")
    return 0


def run_invites_create(args: argparse.Namespace) -> int:
    from mistral_serve.db import invites

    with open_database(settings_from(args))() as session:
        plan = existing_plan(session, args.plan) if args.plan else None
        invite, code = invites.create_invite(session, plan=plan, note=args.note,
                                             lifetime=timedelta(days=args.expires_in_days))
        print(f"created invitation {invite.id}, valid until {when(invite.expires_at)}"
              + (f", for the plan {plan.name}" if plan else ""))
        print("This is the only time the code is shown; send it to the person you invite:")
        print(code)
    return 0


def run_invites_list(args: argparse.Namespace) -> int:
    from mistral_serve.db import invites

    with open_database(settings_from(args))() as session:
        rows = [(invite.id, invite.note or "", invite.plan.name if invite.plan else "default", when(invite.created_at),
                 when(invite.expires_at), when(invite.used_at) if invite.used_at else "no")
                for invite in invites.list_invites(session)]
    print_table(("ID", "NOTE", "PLAN", "CREATED", "EXPIRES", "USED"), rows)
    return 0
