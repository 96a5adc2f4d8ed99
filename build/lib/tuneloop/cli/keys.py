"""`tuneloop keys`: API keys for the gateway, created, listed and revoked against the database.

Who may call: whoever can open the database (the data dir is the machine's owner's; Postgres its credentials),
so key management needs no running gateway and no key of its own.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.keys import SCOPES

app = typer.Typer(no_args_is_help=True, help="Create, list and revoke the gateway's API keys.")
ScopeOption = Annotated[list[str], typer.Option("--scope", help=f"Scope, repeatable: {', '.join(SCOPES)} (admin "
                                                "holds every scope).")]


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key's holder, unique (letters, digits, . _ -).")],
    scope: ScopeOption,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute this key may send (default: no "
                                            "limit).")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute (prompt + completion, as vLLM "
                                            "counts them; default: no limit).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Create a key and print it once: only its SHA-256 is stored. The key is the last line of the output."""
    from tuneloop.keys import create_key

    key, secret = create_key(STATE.store, name, scope, rpm=rpm, tpm=tpm)
    if json_output:
        print_json({**key.model_dump(mode="json"), "key": secret})
        return
    limits = ", ".join(f"{v} {k}" for k, v in (("rpm", key.rpm), ("tpm", key.tpm)) if v is not None) or "no limits"
    console.print(f"created key {key.id} '{key.name}': scopes {', '.join(key.scopes)}; {limits}")
    console.print("store it now: it is not shown again. Send it as 'Authorization: Bearer <key>'.")
    print(secret)


@app.command("list")
def list_(json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """Every key with its id, scopes, limits and whether it is revoked (never the key itself)."""
    from tuneloop.keys import list_keys

    keys = list_keys(STATE.store)
    if json_output:
        print_json([k.model_dump(mode="json") for k in keys])
        return
    print_table("API keys", ["id", "name", "scopes", "rpm", "tpm", "created", "revoked"],
                [[k.id, k.name, ",".join(k.scopes), k.rpm or "-", k.tpm or "-",
                  k.created_at.isoformat(timespec="seconds"),
                  k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-"] for k in keys])


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Revoke a key: every gateway refuses it within 5 s (their key cache's lifetime). The record stays, so captured
    requests still name the key that sent them."""
    from tuneloop.keys import revoke_key

    key = revoke_key(STATE.store, name)
    if json_output:
        print_json(key.model_dump(mode="json"))
        return
    console.print(f"revoked key {key.id} '{key.name}' at {key.revoked_at}")
