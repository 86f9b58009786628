"""``fedseg-site``: everything a site's data team does, one command.

Every command reads the site's data contract (``--contract``, or ``FEDSEG_SITE_CONTRACT``, or
``contract.yaml`` in the current directory); the key file and the store come from the contract.
Errors print one line naming what to fix and exit with status 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client import pseudonyms
from client.audit_chain import verify_chain
from client.contract import DataContract, load_contract, source_columns
from client.gate import PrivacyGate
from client.site_files import SiteFiles, audit_head_name
from client.site_key import SiteKey, generate_key_file
from client.sources import normalise_id
from common.errors import FedsegError
from common.segment_model import SegmentModel

CONTRACT_ENV = "FEDSEG_SITE_CONTRACT"

DESCRIPTION = """\
Run your site's side of fedseg: check your data contract, manage consent, answer data-subject
requests (access, rectify, erase), label your customers with a published segment model, and
verify what your site has sent.

Your customer data never leaves your site. Customer ids are replaced by pseudonyms as they are
read, and everything this tool stores about customers is encrypted with your site key.

Start with:  fedseg-site keygen   then   fedseg-site check"""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso_time(text: str, error: str) -> datetime:
    """Parse ISO 8601 (a naive time is UTC); raise ``error`` as the user's message."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise FedsegError(error) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _parse_time(text: str | None, what: str) -> datetime:
    if text is None or text == "":
        return _now()
    return _iso_time(text, f"{what}={text!r} is not a date/time; expected ISO 8601, e.g. "
                           "2026-11-29 or 2026-11-29T14:00:00+00:00.")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


class Site:
    """The site's contract, gate and files, opened once per command."""

    def __init__(self, contract_path: Path) -> None:
        self.contract_path = contract_path
        self.contract: DataContract = load_contract(contract_path)
        self._gate: PrivacyGate | None = None

    @property
    def gate(self) -> PrivacyGate:
        """The site's privacy gate (opens key and store on first use)."""
        if self._gate is None:
            key = SiteKey.load(self.contract.key_path)
            from client.site_store import SiteStore

            self._gate = PrivacyGate(self.contract, key=key,
                                     store=SiteStore(self.contract.store_url, key))
        return self._gate

    @property
    def files(self) -> SiteFiles:
        """The site's logs and ledgers (audit log, privacy ledger)."""
        return SiteFiles(self.contract.state_dir, self.contract.site.name)

    def close(self) -> None:
        """Release the store."""
        if self._gate is not None:
            self._gate.close()


# -- commands --------------------------------------------------------------------------------


def _subject(site: Site, raw_id: str, *, allow_absent: bool = False) -> str:
    """Return the pseudonym of a subject the source holds (refuse an unknown id).

    Ids are compared as every reader normalises them (surrounding white space removed; case
    kept). An id that matches no valid row of the source is refused unless ``allow_absent``
    (``--not-in-source``): recording consent or an erasure for a mistyped id would silently
    miss the real subject.
    """
    normal = normalise_id(raw_id)
    if normal is None:
        raise FedsegError("the subject id is empty.")
    pseudonym, row = site.gate.find(normal)
    if row is None and not allow_absent:
        raise FedsegError("no valid row of the source has this subject id (ids are compared "
                          "without surrounding spaces; case matters). Check the id, or pass "
                          "--not-in-source to record it for a subject the source no longer "
                          "(or not yet) holds.")
    return pseudonym


def cmd_keygen(site: Site, args: argparse.Namespace) -> int:
    """Create the site key file."""
    key = generate_key_file(site.contract.key_path, force=args.force)
    print(f"created site key {site.contract.key_path} (id {key.key_id}, owner-only "
          "permissions). Back it up somewhere safe: without it the store cannot be read and "
          "pseudonyms cannot be recomputed.")
    return 0


def cmd_check(site: Site, args: argparse.Namespace) -> int:
    """Validate the contract against its source and show what will be used and ignored."""
    c = site.contract
    print(f"contract   {site.contract_path} (site {c.site.name}, purpose {c.purpose})")
    print(f"source     {c.source_location} ({c.source.kind}, {c.source.level}-level)")
    read = source_columns(c)
    print(f"reads      {', '.join(read)}")
    header = _source_header(c)
    if header is not None and not set(read) <= set(header):
        # not echoed: a file without its header row would show a customer's record here
        print(f"columns    the source has {len(header)} column(s) but not all the contract "
              "reads; the error below names the missing one(s)")
        header = None
    if header is not None:
        ignored = [h for h in header if h not in read]
        identifiers = [h for h in ignored if h in c.direct_identifiers]
        others = [h for h in ignored if h not in c.direct_identifiers]
        if identifiers:
            print(f"never read {', '.join(identifiers)} (direct identifiers, by contract)")
        if others:
            print(f"ignored    {', '.join(others)} (not named by the contract)")
    for f in c.features:
        detail: str = f.type
        if f.unit:
            detail += f", {f.unit}"
        if f.clip:
            detail += f", clipped to [{f.clip[0]:g}, {f.clip[1]:g}]"
        if f.transform != "none":
            detail += f", {f.transform}"
        if f.vocabulary:
            detail += f", one of {f.vocabulary}"
        if f.aggregate:
            detail += f", aggregate {f.aggregate}" + (f" ({f.category})" if f.category else "")
        print(f"feature    {f.name}: {f.label or f.name} ({detail})")
    print(f"consent    {c.consent.mode}" + (f" (column {c.consent.column}, ledger "
                                             "withdrawals override it)" if c.consent.column
                                             else " (site store)"))
    print(f"invalid    {c.on_invalid}")
    print("pseudonyms HMAC-SHA256 under the site key, " + (
        "batch hashing in C (OpenSSL)" if pseudonyms.backend() == "native" else
        "hashed in Python: the C module was not built (no C compiler or OpenSSL headers at "
        "install time); same pseudonyms, slower on large sources"))
    if not c.key_path.is_file():
        print(f"key        {c.key_path} does not exist yet: run fedseg-site keygen")
        return 2
    data = site.gate.load()
    report = data.report
    print(f"rows       {report.rows_read} read, {report.used} would take part now")
    for reason, count in report.excluded.items():
        if count:
            print(f"excluded   {count} {reason.replace('_', ' ')}")
    for reason, count in report.invalid_by_reason.items():
        print(f"  invalid  {count} {reason}")
    for name, count in report.clipped.items():
        print(f"clipped    {count} value(s) of {name}")
    if report.transactions:
        t = report.transactions
        print(f"transactions {t.get('read')} read, {t.get('invalid')} invalid, "
              f"{t.get('after_as_of')} after as_of")
    return 0


def _source_header(c: DataContract) -> list[str] | None:
    """Column names of the source (no values), to show what is ignored."""
    try:
        if c.source.path is not None:
            from client.sources import connect_engine

            path = str(c.resolve(c.source.path))
            fn = "read_parquet(?)" if c.source.kind == "parquet" else \
                "read_csv(?, header=true, all_varchar=true)"
            con = connect_engine()
            try:
                rows = con.execute(f"DESCRIBE SELECT * FROM {fn}", [path]).fetchall()
            finally:
                con.close()
            return [str(r[0]) for r in rows]
        from sqlalchemy import inspect

        from client.sources import open_engine

        engine, _ = open_engine(c)  # read-only for SQLite files (never creates one)
        try:
            return [col["name"] for col in inspect(engine).get_columns(str(c.source.table))]
        finally:
            engine.dispose()
    except Exception:  # only for display; the gate reports the real error
        return None


def cmd_consent(site: Site, args: argparse.Namespace) -> int:
    """Consent ledger commands."""
    store, key, purpose = site.gate.store, site.gate.key, site.contract.purpose
    if args.consent_command == "status":
        data = site.gate.load()
        at = _now()
        active, withdrawn = store.consent_state(purpose, at)
        _print_json({"purpose": purpose, "at": at.isoformat(),
                     "ledger_active": len(active), "ledger_withdrawn": len(withdrawn),
                     "source_rows": data.report.rows_read, "taking_part_now": data.report.used,
                     "excluded": data.report.excluded,
                     "coverage": round(data.report.used / data.report.rows_read, 4)
                     if data.report.rows_read else 0.0})
        return 0
    if args.consent_command == "import":
        erased = store.erased()
        records = list(_consent_file(Path(args.file), args, key, erased))
        count = store.import_consents(records, purpose=purpose)
        print(f"imported {count} consent record(s) for purpose {purpose} from {args.file}")
        return 0
    pseudonym = _subject(site, args.id, allow_absent=args.not_in_source)
    at = _parse_time(args.at, "--at")
    when = "from the next round on" if at <= _now() else \
        f"from {at.isoformat()} on (a future date: check it)"
    if args.consent_command == "grant":
        if store.erasure(pseudonym) is not None:
            raise FedsegError("this subject was erased; an erased subject never takes part "
                              "again, and no consent is recorded for it.")
        changed = store.grant(pseudonym, purpose=purpose, at=at, source=args.source)
        print(f"consent granted; the subject takes part {when}" if changed
              else "consent was already active")
    else:
        changed = store.withdraw(pseudonym, purpose=purpose, at=at, source=args.source)
        cleared = store.clear_assignment(pseudonym)
        print((f"consent withdrawn; the subject is excluded {when}" if changed
               else "no active consent to withdraw")
              + ("; its segment label was removed" if cleared else ""))
    return 0


def _consent_file(path: Path, args: argparse.Namespace, key: SiteKey, erased: set[str]
                  ) -> Any:
    """Yield (pseudonym, granted_at, withdrawn_at, source) from a consent CSV."""
    where = str(path)
    default_grant = None if args.granted_at is None else _parse_time(args.granted_at,
                                                                      "--granted-at")
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise FedsegError(f"consent file {where}: cannot be read ({exc.strerror}).") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for column in (args.id_column, args.granted_column):
            if column not in header:
                # the header is not echoed: a file without one would show a customer's record
                raise FedsegError(f"consent file {where}: no column {column!r} in its header "
                                  f"row ({len(header)} column(s)); expected at least "
                                  f"{args.id_column!r} and {args.granted_column!r} (set "
                                  "--id-column / --granted-column).")
        has_withdrawn = args.withdrawn_column in header
        for row_no, row in enumerate(reader, start=1):
            subject = normalise_id(row.get(args.id_column))
            if subject is None:
                raise FedsegError(f"consent file {where}, row {row_no}, column "
                                  f"{args.id_column!r}: empty subject id.")
            granted = _cell_time(row.get(args.granted_column), where, row_no,
                                 args.granted_column, default_grant)
            withdrawn = _cell_time(row.get(args.withdrawn_column), where, row_no,
                                   args.withdrawn_column, default_grant) \
                if has_withdrawn else None
            if granted is None and withdrawn is None:
                continue  # neither granted nor withdrawn: no consent record to keep
            if granted is not None and withdrawn is not None and withdrawn < granted:
                raise FedsegError(f"consent file {where}, row {row_no}, column "
                                  f"{args.withdrawn_column!r}: the withdrawal is dated before "
                                  "the grant; expected withdrawn_at >= granted_at.")
            pseudonym = key.pseudonym(subject)
            if pseudonym in erased:
                continue  # an erased subject never gets consent records again
            yield pseudonym, granted, withdrawn, args.source or f"import:{path.name}"


def _cell_time(cell: str | None, where: str, row: int, column: str,
               default: datetime | None) -> datetime | None:
    text = (cell or "").strip()
    if not text or text.lower() in ("false", "no", "0"):
        return None
    if text.lower() in ("true", "yes", "1"):
        if default is None:
            # "now" would date a stale export's grants after any later withdrawal
            raise FedsegError(f"consent file {where}, row {row}, column {column!r}: a yes/no "
                              "value has no date; give the date it stands for with "
                              "--granted-at DATE (or put dates in the file).")
        return default
    return _iso_time(text, f"consent file {where}, row {row}, column {column!r}: expected an "
                           "ISO 8601 date/time or true/false.")


def cmd_access(site: Site, args: argparse.Namespace) -> int:
    """Print everything the site holds on one subject, as JSON."""
    gate = site.gate
    pseudonym, row = gate.find(args.id)
    erasure = gate.store.erasure(pseudonym)
    history = gate.store.consent_history(pseudonym)
    assignment = gate.store.assignment(pseudonym)
    held = bool(history or assignment)
    answer: dict[str, Any] = {"subject": args.id, "pseudonym": pseudonym,
                              "purpose": site.contract.purpose}
    if erasure is not None:
        answer.update({"held": held, "erased": erasure,
                       "statement": "nothing is held on this subject: it was erased; the "
                       "erasure log keeps only its pseudonym so it stays excluded"
                       + ("" if row is None else "; the source system still has a record, "
                          "which fedseg excludes from every computation")})
        _print_json(answer)
        return 0
    data = gate.load()
    taking_part = bool(np.any(data.pseudonyms == pseudonym))
    features = None if row is None else {
        spec.name: float(v) for spec, v in zip(gate.features, row, strict=True)}
    answer.update({
        "held": held or row is not None,
        "in_source": row is not None,
        "consent_history": history,
        "takes_part_in_rounds_now": taking_part,
        "features_used": features,
        "current_segment": assignment,
        "erased": None,
    })
    _print_json(answer)
    return 0


def cmd_rectify(site: Site, args: argparse.Namespace) -> int:
    """Re-read one subject from the source; drop its stale segment label."""
    gate = site.gate
    pseudonym, row = gate.find(args.id)
    if row is None:
        raise FedsegError("no valid row of the source has this subject id (or its row is "
                          "invalid); correct it there first, then rerun rectify.")
    removed = gate.store.clear_assignment(pseudonym)
    _print_json({"features_used_from_next_round": {
        spec.name: float(v) for spec, v in zip(gate.features, row, strict=True)},
        "stale_segment_label_removed": removed,
        "note": "the gate re-reads the source at every round: the corrected values are used "
                "from the next round on; run fedseg-site assign to relabel."})
    return 0


def cmd_erase(site: Site, args: argparse.Namespace) -> int:
    """Erase one subject from every site store and exclude it from every later round."""
    gate = site.gate
    pseudonym = _subject(site, args.id, allow_absent=args.not_in_source)
    before = gate.store.erasure(pseudonym)
    counts = gate.store.erase(pseudonym, at=_now(), reason=args.reason)  # idempotent
    if before is not None:
        print("already erased" + ("" if not any(counts.values()) else
                                  f"; removed records written since: {counts}"))
        return 0
    _print_json({"erased": True, "deleted": counts,
                 "note": "excluded from every round from the next one on; the erasure log "
                         "keeps only the pseudonym. Delete the record from your source "
                         "system too if your process requires it."})
    return 0


def cmd_assign(site: Site, args: argparse.Namespace) -> int:
    """Label the consenting customers with a segment model, into the encrypted store."""
    model_path = Path(args.model)
    model = SegmentModel.load(model_path)
    gate = site.gate
    ours = [f.name for f in gate.features]
    theirs = [f.name for f in model.features]
    if sorted(ours) != sorted(theirs):
        raise FedsegError(f"segment model {model_path} uses features {theirs}; this site's "
                          f"contract declares {ours}. Use a model trained on these features.")
    data = gate.load()
    order = [ours.index(name) for name in theirs]
    labels = model.assign(data.site.raw[:, order])
    names = [model.segments[int(i)].name for i in labels]
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    gate.store.replace_assignments(list(data.pseudonyms), [int(i) for i in labels], names,
                                   model_sha256=sha, at=_now())
    sizes = np.bincount(labels, minlength=len(model.segments))
    print(f"assigned {len(labels)} consenting customer(s) with {model_path.name} "
          f"(sha256 {sha[:12]}); stored encrypted in the site store:")
    for segment, size in zip(model.segments, sizes, strict=True):
        print(f"  {segment.name:<44} {int(size):>8}")
    return 0


def cmd_export(site: Site, args: argparse.Namespace) -> int:
    """Write the labels of customers taking part now as CSV, with the site's own ids."""
    gate = site.gate
    stored = dict(gate.store.iter_assignments())
    if not stored:
        raise FedsegError("no assignments in the store; run fedseg-site assign --model FILE "
                          "first.")
    taking_part = set(gate.load().pseudonyms.tolist())  # withdrawn / erased: never exported
    out = Path(args.out)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # also when the file already existed with wider permissions
    except OSError as exc:
        raise FedsegError(f"cannot write {out} ({exc.strerror}); expected a writable path "
                          "(not a symbolic link).") from None
    written = 0
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([site.contract.subject_id, "segment_id", "segment_name"])
        for raw_id, pseudonym in gate.raw_ids():
            entry = stored.get(pseudonym)
            if entry is not None and pseudonym in taking_part:
                writer.writerow([raw_id, entry["segment_id"], entry["segment_name"]])
                written += 1
    print(f"wrote {written} assignment(s) of customers taking part now to {out} (owner-only "
          "permissions; it holds your customer ids: keep it inside your site).")
    return 0


def cmd_audit(site: Site, args: argparse.Namespace) -> int:
    """Verify the hash chain of the site's audit log."""
    path = Path(args.log) if args.log else site.files.audit_log
    head = None if args.no_store else site.gate.store.get_meta(
        f"audit_head:{audit_head_name(path)}")
    result = verify_chain(path, expected_head=head)
    if result.ok:
        print(f"audit log {path}: {result.lines} line(s), chain intact"
              + (", head matches the site store" if head else ""))
        return 0
    print(f"audit log {path}: NOT intact: {result.problem}")
    return 2


def cmd_rotate_key(site: Site, args: argparse.Namespace) -> int:
    """Replace the site key and re-key the store (pseudonyms and encryption)."""
    gate = site.gate
    key_path = site.contract.key_path
    new_path = key_path.with_name(key_path.name + ".new")
    if new_path.exists():
        raise FedsegError(f"{new_path} exists: a previous rotation stopped half-way. If the "
                          "store already uses it (fedseg-site check says the store was created "
                          "with another key), move it to " f"{key_path}; otherwise delete it.")
    pairs = gate.raw_ids()
    new_key = generate_key_file(new_path)
    fresh = new_key.pseudonymise(raw for raw, _ in pairs)
    mapping = {old: new for (_, old), new in zip(pairs, fresh, strict=True)}
    orphans = [p for p in gate.store.erased() if p not in mapping]
    if orphans:
        new_path.unlink()
        raise FedsegError(f"{len(orphans)} erased subject(s) are no longer in the source: "
                          "after a rotation their erasures could not be matched if their "
                          "records came back, so the key is not rotated. Rotate while the "
                          "source still holds them, or keep the current key.")
    counts = gate.store.rekey(new_key, mapping)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    retired = key_path.with_name(f"{key_path.name}.retired-{stamp}")
    os.replace(key_path, retired)
    os.replace(new_path, key_path)
    _print_json({"new_key_id": new_key.key_id, "retired_key": str(retired), "rekeyed": counts,
                 "note": "keep the retired key offline until backups made with it expire; "
                         "rows of subjects no longer in the source stay under their old "
                         "pseudonym (counted as unmapped)."})
    return 0


def cmd_report(site: Site, args: argparse.Namespace) -> int:
    """Print a plain compliance summary."""
    gate = site.gate
    data = gate.load()
    r = data.report
    files = site.files
    audit = verify_chain(files.audit_log, expected_head=gate.store.get_meta(
        f"audit_head:{audit_head_name(files.audit_log)}"))
    sent = _audit_summary(files.audit_log)
    erased = gate.store.erased()
    still_used = int(sum(1 for p in data.pseudonyms if p in erased))
    spent = files.privacy_events()
    delta = files.privacy_delta() or 1e-6
    from common.dp import epsilon_spent

    desc = gate.store.describe()
    lines = [
        f"fedseg site report: site {site.contract.site.name}, purpose "
        f"{site.contract.purpose}, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"source: {r.source}",
        f"consent coverage: {r.used} of {r.rows_read} customers take part "
        f"({100.0 * r.used / max(r.rows_read, 1):.1f} %)",
        "excluded: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in r.excluded.items()),
    ]
    if r.invalid_by_reason:
        lines.append("invalid rows: " + ", ".join(f"{v} {k}" for k, v in
                                                   r.invalid_by_reason.items()))
    if r.clipped:
        lines.append("clipped values: " + ", ".join(f"{v} of {k}" for k, v in
                                                     r.clipped.items()))
    lines += [
        f"erasures: {len(erased)} recorded, "
        + ("all honoured (none in the data used)" if still_used == 0
           else f"{still_used} STILL USED"),
        f"shared: {sent['messages']} message(s), {sent['bytes']:,} bytes, mechanisms "
        f"{sent['mechanisms'] or ['none']}, refusals {sent['refusals']}",
        f"differential privacy: {len(spent)} release(s), epsilon spent "
        f"{epsilon_spent(spent, delta) if spent else 0.0:.4f} (delta {delta:g}, the site "
        "policy's, as recorded in its privacy ledger)",
        f"audit log: {'intact' if audit.ok else 'NOT INTACT: ' + str(audit.problem)}"
        f" ({audit.lines} line(s))",
        f"encryption at rest: {desc.get('encryption')}",
        f"key: id {desc.get('key_id')}, created {desc.get('key_created_at')}, "
        f"age {desc.get('key_age_days')} day(s)",
    ]
    print("\n".join(lines))
    return 0 if audit.ok and still_used == 0 else 2


def _audit_summary(path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"messages": 0, "bytes": 0, "mechanisms": [], "refusals": 0}
    if not path.is_file():
        return summary
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        summary["messages"] += 1
        size = entry.get("bytes", 0)
        summary["bytes"] += size if isinstance(size, int) else 0
        if entry.get("error_code"):
            summary["refusals"] += 1
        mech = entry.get("mechanism")
        if mech and mech not in summary["mechanisms"]:
            summary["mechanisms"].append(mech)
    return summary


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedseg-site`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fedseg-site", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contract", help="your site's data contract (YAML). Default: "
                        f"${CONTRACT_ENV}, else contract.yaml here.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("keygen", help="create the site key (once, before anything else)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing key (the store then needs the old key: avoid)")
    sub.add_parser("check", help="check the contract against the data and show what is used")
    p = sub.add_parser("consent", help="record and inspect customer consent")
    csub = p.add_subparsers(dest="consent_command", metavar="ACTION", required=True)
    imp = csub.add_parser("import", help="import consent records from a CSV file")
    imp.add_argument("file", help="CSV with a customer id column and a granted column")
    imp.add_argument("--id-column", default="customer_id", help="default: customer_id")
    imp.add_argument("--granted-column", default="granted_at",
                     help="date/time consent was given, or true/false (default: granted_at)")
    imp.add_argument("--withdrawn-column", default="withdrawn_at",
                     help="date/time consent was withdrawn, optional (default: withdrawn_at)")
    imp.add_argument("--source", default=None, help="where the records come from (recorded)")
    imp.add_argument("--granted-at", default=None,
                     help="the date a yes/true value in the file stands for (ISO 8601)")
    for action, text in (("grant", "record that a customer gave consent"),
                         ("withdraw", "record that a customer withdrew consent")):
        a = csub.add_parser(action, help=text)
        a.add_argument("id", help="the customer's id as in your data")
        a.add_argument("--at", default=None, help="when (ISO 8601; default: now)")
        a.add_argument("--source", default="fedseg-site", help="who recorded it")
        a.add_argument("--not-in-source", action="store_true",
                       help="record it even though your data has no such customer")
    csub.add_parser("status", help="how many customers take part, and why others do not")
    p = sub.add_parser("access", help="show everything held on one customer (JSON)")
    p.add_argument("id", help="the customer's id as in your data")
    p = sub.add_parser("rectify", help="re-read one customer from your data after a correction")
    p.add_argument("id", help="the customer's id as in your data")
    p = sub.add_parser("erase", help="erase one customer and exclude them from every later round")
    p.add_argument("id", help="the customer's id as in your data")
    p.add_argument("--reason", default="data subject request", help="recorded with the erasure")
    p.add_argument("--not-in-source", action="store_true",
                   help="erase a customer your data no longer (or not yet) holds")
    p = sub.add_parser("assign", help="label your consenting customers with a segment model")
    p.add_argument("--model", required=True, help="segments.json published by the federation")
    p = sub.add_parser("export-assignments",
                       help="write the labels as CSV for your own marketing tools")
    p.add_argument("--out", required=True, help="CSV file to write (holds your customer ids)")
    p = sub.add_parser("audit", help="check that the audit log was not changed")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="verify the hash chain of the audit log")
    v.add_argument("--log", default=None, help="audit log file (default: the site's own)")
    v.add_argument("--no-store", action="store_true",
                   help="do not compare the end of the log with the head kept in the store")
    sub.add_parser("report", help="plain compliance summary: consent, exclusions, what was "
                   "shared, encryption, key age")
    sub.add_parser("rotate-key", help="replace the site key and re-encrypt the store with it "
                   "(reads your data to re-pseudonymise)")
    return parser


COMMANDS = {"keygen": cmd_keygen, "check": cmd_check, "consent": cmd_consent,
            "access": cmd_access, "rectify": cmd_rectify, "erase": cmd_erase,
            "assign": cmd_assign, "export-assignments": cmd_export, "audit": cmd_audit,
            "report": cmd_report, "rotate-key": cmd_rotate_key}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedseg-site``; returns the exit status (0 ok, 2 user error, 1 internal)."""
    args = build_parser().parse_args(argv)
    contract = Path(args.contract or os.environ.get(CONTRACT_ENV) or "contract.yaml")
    site: Site | None = None
    try:
        site = Site(contract)
        return COMMANDS[args.command](site, args)
    except FedsegError as exc:
        print(f"fedseg-site: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for the user; the type tells a developer
        print(f"fedseg-site: internal error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    finally:
        if site is not None:
            site.close()


if __name__ == "__main__":
    sys.exit(main())
