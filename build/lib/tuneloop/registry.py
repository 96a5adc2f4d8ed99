"""The adapter registry: every trained adapter is an immutable, numbered version of its task with a card.

Versions are written as `task@N`. Aliases (`champion`, `candidate`) are movable pointers stored in the database,
so flipping one is a single atomic row update. The folder of a version lives under `<data_dir>/adapters/<task>/vN`
and holds the PEFT files plus `card.json`: base model checksum, dataset versions, hyperparameters, training
curve, parent version and git commit, i.e. enough to reproduce or audit the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from tuneloop.checksums import weights_sha256
from tuneloop.errors import AdapterError, StoreError
from tuneloop.events import record_event
from tuneloop.parsing import is_integer
from tuneloop.store import Store
from tuneloop.tables import AdapterVersionRow, AliasRow, EventRow, utcnow

Alias = Literal["champion", "candidate"]
ALIASES: tuple[Alias, ...] = ("champion", "candidate")
CARD_FILE = "card.json"


class CurvePoint(BaseModel):
    step: int
    train_loss: float | None = None
    val_loss: float | None = None


class DatasetRef(BaseModel):
    ref: str = Field(description="task/name@version")
    kind: str
    sha256: str
    rows: int


class ImportSource(BaseModel):
    """The folder an imported adapter was copied from, and its weights as they were there."""

    path: str
    weights_file: str
    weights_sha256: str


class AdapterCard(BaseModel):
    """Everything needed to audit or reproduce an adapter; saved as card.json beside its weights."""

    task: str
    version: int | None = Field(default=None, description="Assigned at registration.")
    method: str
    base_model: dict[str, str] = Field(description="name, sha256")
    datasets: list[DatasetRef]
    hyperparameters: dict[str, Any]
    curve: list[CurvePoint] = Field(default_factory=list)
    steps: int = 0
    stopped_early: bool = False
    best_val_loss: float | None = None
    trainable_params: int = 0
    total_params: int = 0
    train_tokens: int = Field(default=0, description="Non-padding tokens seen in training.")
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    parent_version: int | None = None
    git_commit: str | None = None
    library_versions: dict[str, str] = Field(default_factory=dict)
    weights_sha256: str | None = Field(default=None, description="sha256 of the adapter weight files.")
    origin: Literal["trained", "imported"] = Field(
        default="trained", description="trained by tuneloop, or imported with `tuneloop adapters import`.")
    imported_from: ImportSource | None = Field(default=None, description="Where an imported adapter came from.")
    device: str | None = Field(default=None, description="Where it was trained (cuda, cpu); unknown if imported.")
    precision: str | None = Field(default=None, description="Training precision (bf16-autocast, fp32).")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def lora_rank(self) -> int | None:
        return self.hyperparameters.get("rank") if self.method == "lora" else None


class AdapterVersion(BaseModel):
    """A registered version with its aliases."""

    task: str
    version: int
    method: str
    path: Path
    base_model_sha256: str
    parent_version: int | None
    created_at: datetime
    aliases: list[str] = Field(default_factory=list)
    card: AdapterCard

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.version}"


@dataclass(frozen=True)
class Promotion:
    """An alias move that made `champion` its task's champion: hot-swapped in a running gateway
    (`through_gateway`), or flipped in the registry alone when no gateway ran."""

    task: str
    champion: str
    previous: str | None
    through_gateway: bool


def parse_ref(ref: str) -> tuple[str, str]:
    """'sentiment@2' -> ('sentiment', '2'); 'sentiment@champion' -> ('sentiment', 'champion')."""
    task, sep, version = ref.partition("@")
    if not sep or not task or not version:
        raise AdapterError(f"'{ref}' is not an adapter version; write task@N (e.g. sentiment@2) or task@champion")
    return task, version


def register_adapter(store: Store, data_dir: Path, trained_dir: Path, card: AdapterCard) -> AdapterVersion:
    """Move a freshly trained folder into the registry as the task's next version.

    The first LoRA version of a task becomes its champion, so a new task is servable right away.
    """
    if not trained_dir.is_dir():
        raise AdapterError(f"trained adapter folder {trained_dir} does not exist")
    card = card.model_copy(update={"weights_sha256": adapter_weights_sha256(trained_dir)})
    task_dir = data_dir / "adapters" / card.task
    task_dir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        with store.session() as session:
            latest = session.scalar(select(func.max(AdapterVersionRow.version))
                                    .where(AdapterVersionRow.task == card.task))
        version = (latest or 0) + 1
        final = task_dir / f"v{version}"
        if final.exists():
            shutil.rmtree(final)
        numbered = card.model_copy(update={"version": version})
        (trained_dir / CARD_FILE).write_text(numbered.model_dump_json(indent=2))
        try:
            with store.session() as session:
                row = AdapterVersionRow(task=card.task, version=version, method=card.method, path=str(final),
                                        base_model_sha256=card.base_model["sha256"],
                                        parent_version=card.parent_version,
                                        card=json.loads(numbered.model_dump_json()))
                session.add(row)
                session.flush()
                os.replace(trained_dir, final)
                has_champion = session.get(AliasRow, (card.task, "champion")) is not None
                if card.method == "lora" and not has_champion:
                    session.add(AliasRow(task=card.task, alias="champion", adapter_id=row.id))
        except StoreError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                if final.exists() and not trained_dir.exists():
                    os.replace(final, trained_dir)
                raise
            continue  # another registration took this number (the store wraps the driver's IntegrityError)
        except Exception:
            if final.exists() and not trained_dir.exists():
                os.replace(final, trained_dir)
            raise
        record_event(store, "adapter_registered", f"{card.task}@{version} ({card.method}) registered",
                     task=card.task, payload={"version": version, "method": card.method,
                                              "champion": card.method == "lora" and not has_champion})
        return get_adapter(store, f"{card.task}@{version}")
    raise AdapterError(f"could not allocate a version number for task {card.task} (concurrent registrations)")


def list_adapters(store: Store, task: str | None = None) -> list[AdapterVersion]:
    query = select(AdapterVersionRow).order_by(AdapterVersionRow.task, AdapterVersionRow.version)
    if task:
        query = query.where(AdapterVersionRow.task == task)
    with store.session() as session:
        aliases = _aliases_by_id(session)
        return [_to_version(row, aliases.get(row.id, [])) for row in session.scalars(query)]


def get_adapter(store: Store, ref: str) -> AdapterVersion:
    """Resolve `task@N` or `task@alias` to a registered version."""
    task, version = parse_ref(ref)
    with store.session() as session:
        if is_integer(version):
            row = session.scalars(select(AdapterVersionRow).where(
                AdapterVersionRow.task == task, AdapterVersionRow.version == int(version))).first()
        elif version in ALIASES:
            alias = session.get(AliasRow, (task, version))
            row = session.get(AdapterVersionRow, alias.adapter_id) if alias else None
        else:
            raise AdapterError(f"'{version}' in '{ref}' is neither a version number nor an alias {list(ALIASES)}")
        if row is None:
            known = [f"{task}@{v}" for v in session.scalars(
                select(AdapterVersionRow.version).where(AdapterVersionRow.task == task))]
            raise AdapterError(f"no adapter {ref}; registered for '{task}': {known or 'none'}")
        return _to_version(row, _aliases_by_id(session).get(row.id, []))


def find_alias(store: Store, task: str, alias: Alias) -> AdapterVersion | None:
    try:
        return get_adapter(store, f"{task}@{alias}")
    except AdapterError:
        return None


def alias_versions(store: Store) -> dict[tuple[str, Alias], int]:
    """Every alias of every task and the version it points at, in one query (what gateways poll)."""
    with store.session() as session:
        rows = session.execute(select(AliasRow.task, AliasRow.alias, AdapterVersionRow.version).join(
            AdapterVersionRow, AdapterVersionRow.id == AliasRow.adapter_id))
        return {(task, alias): version for task, alias, version in rows if alias in ALIASES}


def set_alias(store: Store, ref: str, alias: Alias, *, reason: str = "",
              clear: Alias | None = None) -> AdapterVersion | None:
    """Point `alias` of the version's task at it; returns the version it pointed at before (if any).

    The alias row, its event and (with `clear`) the removal of another alias that pointed at the same version are
    one transaction: rollback finds the previous champion in the event, so a process killed between an alias
    flip and its event would leave a champion nobody can roll back from."""
    target = get_adapter(store, ref)
    if alias == "champion" and target.method != "lora":
        raise AdapterError(f"{ref} is a {target.method} model; only LoRA adapters can be served as champion")
    with store.session() as session:
        adapter_id = session.scalars(select(AdapterVersionRow.id).where(
            AdapterVersionRow.task == target.task, AdapterVersionRow.version == target.version)).one()
        row = session.get(AliasRow, (target.task, alias))
        previous_row = session.get(AdapterVersionRow, row.adapter_id) if row is not None else None
        previous = (_to_version(previous_row, _aliases_by_id(session).get(previous_row.id, []))
                    if previous_row is not None else None)
        if row is None:
            session.add(AliasRow(task=target.task, alias=alias, adapter_id=adapter_id))
        else:
            row.adapter_id = adapter_id
            row.updated_at = utcnow()
        if clear is not None:
            other = session.get(AliasRow, (target.task, clear))
            if other is not None and other.adapter_id == adapter_id:
                session.delete(other)
        session.add(EventRow(kind=f"alias_{alias}_set",
                             message=f"{alias} of {target.task} -> {ref}" + (f" ({reason})" if reason else ""),
                             task=target.task, payload={"alias": alias, "version": target.version,
                                                        "previous": previous.version if previous else None}))
    return previous


def clear_alias(store: Store, task: str, alias: Alias) -> None:
    with store.session() as session:
        row = session.get(AliasRow, (task, alias))
        if row is not None:
            session.delete(row)


def verify_adapter(version: AdapterVersion) -> None:
    """Refuse a version whose folder is missing or whose weights changed since registration."""
    if not version.path.is_dir():
        raise AdapterError(f"{version.ref}: folder {version.path} is missing")
    config = version.path / "adapter_config.json"
    if version.method in ("lora", "prompt-tuning"):
        if not config.exists():
            raise AdapterError(f"{version.ref}: {config} is missing")
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{version.ref}: {config} is not valid JSON ({exc})") from None
    expected = version.card.weights_sha256
    if expected and adapter_weights_sha256(version.path) != expected:
        raise AdapterError(f"{version.ref}: weights in {version.path} do not match the checksum in its card "
                           "(corrupt or modified)")


def adapter_weights_sha256(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{folder} holds no *.safetensors weights")
    return weights_sha256(files)


def _aliases_by_id(session: Any) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias in session.scalars(select(AliasRow)):
        out.setdefault(alias.adapter_id, []).append(alias.alias)
    return out


def _to_version(row: AdapterVersionRow, aliases: list[str]) -> AdapterVersion:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return AdapterVersion(task=row.task, version=row.version, method=row.method, path=Path(row.path),
                          base_model_sha256=row.base_model_sha256, parent_version=row.parent_version,
                          created_at=created, aliases=sorted(aliases),
                          card=AdapterCard.model_validate(row.card))
