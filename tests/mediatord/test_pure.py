"""The mediator's pure parts: audit round logic (with the cheats it must catch), placement, policies, repair."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fincryptfs.core.challenge import LeafProof, ShareProof, build_share_proof
from fincryptfs.core.errors import ConfigError, ErasureError, ForbiddenError, PolicyError
from fincryptfs.core.identity import SigningKey
from fincryptfs.core.ids import new_share_id
from fincryptfs.core.layout import ObjectLayout
from fincryptfs.core.merkle import MerkleTree, hash_leaf, leaf_count
from fincryptfs.core.messages import ProofResponse
from fincryptfs.core.settings import MediatorSettings
from mediatord import audit
from mediatord.placement import Candidate, check_redundancy, place_shares
from mediatord.policies import MarketView, acceptance_rule, pricing_scheme
from mediatord.repair import plan_repair, rebuild_range, rebuild_shares, segment_batches, share_range
from mediatord.service import repair_threshold

MEDIATOR = SigningKey.generate()
NODE = SigningKey.generate()


class StoredShare:
    def __init__(self, size: int = 5 * 4096 + 123) -> None:
        self.share_id = new_share_id()
        self.data = os.urandom(size)
        self.tree = MerkleTree.from_data(self.data)

    @property
    def audited(self) -> audit.AuditedShare:
        return audit.AuditedShare(self.share_id, self.tree.root, len(self.data))

    def proof(self, nonce: bytes, leaves: int) -> ShareProof:
        return build_share_proof(nonce, self.share_id, len(self.data), leaves,
                                 lambda i: self.data[i * 4096:(i + 1) * 4096], self.tree.range_proof)


def answer(state: audit.NodeAudit, proofs: list[ShareProof], missing: tuple[str, ...] = (), *,
           nonce: bytes | None = None, round_id: int | None = None) -> ProofResponse:
    """Encode with the node key and decode again, exactly as the wire does."""
    response = ProofResponse(NODE.id, MEDIATOR.id, state.round_id if round_id is None else round_id,  # type: ignore[arg-type]
                             state.nonce if nonce is None else nonce, tuple(proofs), missing)  # type: ignore[arg-type]
    return ProofResponse.decode(response.encode(NODE), NODE.public, max_bytes=1 << 24)


def start(shares: list[StoredShare], leaves: int = 2) -> audit.NodeAudit:
    return audit.start_audit(MEDIATOR.id, NODE.id, 7, [s.audited for s in shares], leaves)


def test_honest_node_passes_with_fresh_nonce_each_round() -> None:
    shares = [StoredShare(), StoredShare(100)]
    first, second = start(shares), start(shares)
    assert first.nonce != second.nonce and len(first.nonce) == 32
    state = audit.judge_response(first, answer(first, [s.proof(first.nonce, 2) for s in shares]))
    result = audit.outcome(state)
    assert result.result == "passed" and result.proven == {s.share_id for s in shares}
    assert result.bytes_proven == sum(len(s.data) for s in shares)


def test_replayed_answer_fails_every_share() -> None:
    shares = [StoredShare()]
    old = start(shares)
    old_proofs = [s.proof(old.nonce, 2) for s in shares]
    new = start(shares)
    state = audit.judge_response(new, answer(new, old_proofs, nonce=old.nonce))
    assert audit.outcome(state).result == "failed"
    assert "replayed" in next(iter(state.lost.values()))
    # even a replay with the new nonce copied in fails: the leaves were chosen by the old nonce
    state = audit.judge_response(new, answer(new, old_proofs))
    assert audit.outcome(state).result == "failed" or old_proofs == [s.proof(new.nonce, 2) for s in shares]


def test_node_keeping_only_the_tree_fails() -> None:
    share = StoredShare()
    state = start([share])
    honest = share.proof(state.nonce, 2)
    # without the data it can only send leaf hashes (or anything else) in place of the leaf bytes
    fake = ShareProof(share.share_id, tuple(LeafProof(leaf.index, hash_leaf(leaf.data), leaf.path)
                                            for leaf in honest.leaves))
    judged = audit.judge_response(state, answer(state, [fake]))
    assert audit.outcome(judged).result == "failed" and share.share_id in judged.lost


def test_deleted_share_and_partial_answers() -> None:
    a, b, c = StoredShare(), StoredShare(), StoredShare()
    state = start([a, b, c])
    state = audit.judge_response(state, answer(state, [a.proof(state.nonce, 2)], missing=(b.share_id,)))
    assert state.proven == {a.share_id} and set(state.lost) == {b.share_id} and state.pending == {c.share_id}
    again = state.challenge
    assert again.share_ids == (c.share_id,) and again.nonce == state.nonce and again.round_id == 7
    state = audit.judge_response(state, answer(state, [c.proof(state.nonce, 2)]))
    assert audit.is_finished(state, retries=3)
    result = audit.outcome(state)
    assert result.result == "failed" and result.proven == {a.share_id, c.share_id}


def test_shares_moved_away_during_the_audit_are_neither_blamed_nor_paid() -> None:
    kept, moved, deleted = StoredShare(), StoredShare(), StoredShare()
    state = start([kept, moved, deleted])
    state = audit.judge_response(state, answer(state, [kept.proof(state.nonce, 2), moved.proof(state.nonce, 2)],
                                               missing=(deleted.share_id,)))
    assert audit.outcome(state).result == "failed"
    result = audit.outcome(audit.forget(state, {moved.share_id, deleted.share_id, "not-asked"}))
    assert result.result == "passed" and result.proven == {kept.share_id} and not result.lost
    assert result.bytes_proven == len(kept.data)
    pending = audit.forget(start([kept, moved]), {moved.share_id})
    assert pending.challenge.share_ids == (kept.share_id,)


def test_retries_then_unreachable_or_unanswered() -> None:
    share = StoredShare()
    state = start([share])
    for _ in range(3):
        assert not audit.is_finished(state, retries=2)
        state = audit.missed(state)
    assert audit.is_finished(state, retries=2)
    assert audit.outcome(state).result == "unreachable"
    # a node that answers but never for this share: the share counts as lost
    other = StoredShare()
    state = start([share, other])
    state = audit.judge_response(state, answer(state, [other.proof(state.nonce, 2)]))
    state = audit.missed(audit.missed(state))
    result = audit.outcome(state)
    assert result.result == "failed" and share.share_id in result.lost


def test_many_shares_are_asked_in_batches_without_spending_retries() -> None:
    shares = [StoredShare(100) for _ in range(5)]
    state = start(shares, leaves=1)
    asked_total: list[str] = []
    while state.pending:
        challenge = state.next_challenge(2)
        assert len(challenge.share_ids) <= 2 and challenge.nonce == state.nonce
        asked_total += challenge.share_ids
        by_id = {s.share_id: s for s in shares}
        proofs = [by_id[i].proof(state.nonce, 1) for i in challenge.share_ids]
        state = audit.judge_response(state, answer(state, proofs), challenge.share_ids)
    assert state.attempts == 0 and sorted(asked_total) == sorted(s.share_id for s in shares)
    assert audit.outcome(state).result == "passed"


def test_reputation_and_disqualification_rules() -> None:
    assert audit.reputation(0, 0) == 0.5
    passed = audit.node_verdict("passed", 3, 1, 2, 3)
    assert passed.reputation == pytest.approx(5 / 7) and not passed.disqualify
    outage = audit.node_verdict("unreachable", 0, 0, 2, 3)
    assert not outage.counts_toward_disqualification and not outage.disqualify and outage.reputation < 0.5
    assert not audit.node_verdict("failed", 0, 0, 1, 3).disqualify
    assert audit.node_verdict("failed", 0, 0, 2, 3).disqualify


def test_unreachable_rounds_in_a_row_make_a_node_unresponsive_until_it_answers() -> None:
    first = audit.node_verdict("unreachable", 0, 0, 0, 3, 0)
    assert (first.unreachable_rounds, first.unresponsive) == (1, False)
    last = audit.node_verdict("unreachable", 5, 2, 0, 3, audit.UNRESPONSIVE_AFTER - 1)
    assert last.unreachable_rounds == audit.UNRESPONSIVE_AFTER and last.unresponsive
    assert not last.counts_toward_disqualification and not last.disqualify  # an outage is still no cheat
    assert audit.node_verdict("unreachable", 0, 0, 0, 3, 10).unresponsive
    for result in ("passed", "failed"):  # any answer ends the streak
        verdict = audit.node_verdict(result, 0, 0, 0, 3, 10)
        assert (verdict.unreachable_rounds, verdict.unresponsive) == (0, False)


def test_out_of_turn_audits_wait_a_quarter_period_and_at_least_a_minute() -> None:
    assert audit.out_of_turn_gap(0.5) == audit.OUT_OF_TURN_MIN_GAP == 60.0
    assert audit.out_of_turn_gap(3600.0) == 900.0


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 1000.0), st.lists(st.tuples(st.floats(0.0, 500.0), st.sampled_from(("a", "b", "c")),
                                                  st.booleans()), max_size=60))
def test_reports_are_coalesced_into_at_most_one_out_of_turn_audit_per_node_and_gap(
        gap: float, events: list[tuple[float, str, bool]]) -> None:
    """Events are (time since the previous one, node, a report of it or a housekeeping pass). However often a
    node is reported, its audits start at least ``gap`` apart, and every report is served by an audit that
    starts no earlier than it."""
    queue = audit.OutOfTurnAudits(gap)
    now = 0.0
    audits: dict[str, list[float]] = {}
    reports: dict[str, list[float]] = {}
    for step, node, is_report in events:
        now += step
        if is_report:
            queue.request(node)
            reports.setdefault(node, []).append(now)
        else:
            for due in queue.take_due(now):
                audits.setdefault(due, []).append(now)
    for due in queue.take_due(now + gap):  # a pass once every gap is over serves every report left
        audits.setdefault(due, []).append(now + gap)
    assert not queue.requested
    for times in audits.values():
        assert all(later >= earlier + gap for earlier, later in zip(times, times[1:], strict=False))
    for node, times in reports.items():
        assert max(audits.get(node, [-1.0])) >= max(times)
        assert len(audits[node]) <= len(times)


def test_a_database_from_before_the_unreachable_count_opens(tmp_path: Path) -> None:
    import sqlite3

    from mediatord.db import MediatorDB
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE nodes (node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, url TEXT NOT NULL,"
                     " price INTEGER, capacity INTEGER NOT NULL, free INTEGER NOT NULL, operator TEXT NOT NULL"
                     " DEFAULT '', payout_address TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL, state TEXT"
                     " NOT NULL DEFAULT 'online', reputation REAL NOT NULL DEFAULT 0.5, passed INTEGER NOT NULL"
                     " DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, consecutive_failures INTEGER NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO nodes (node_id, public_key, url, capacity, free, first_seen, last_seen)"
                     " VALUES ('n', x'00', 'http://a:1', 1, 1, 0, 0)")
    conn.close()
    db = MediatorDB(path)
    row = db.node("n")
    assert row is not None and row.unreachable_rounds == 0 and row.state == "online"
    db.close()


def cand(node_id: str, price: int = 100, operator: str = "", ip: str = "10.0.0.1", free: int = 10**9,
         reputation: float = 0.5, online: bool = True) -> Candidate:
    return Candidate(node_id * 64, f"http://{ip}:8701", price, free, operator, reputation, online)


def test_placement_cheapest_distinct_and_spread() -> None:
    pool = [cand("a", 10, "op1", "10.0.0.1"), cand("b", 11, "op1", "10.0.1.1"), cand("c", 12, "op2", "10.0.0.2"),
            cand("d", 13, "op3", "10.0.2.1"), cand("e", 1, "op4", "10.0.3.1", online=False),
            cand("f", 1, "op5", "10.0.4.1", free=10), cand("g", 1, "op6", "10.0.5.1", reputation=0.1)]
    chosen = place_shares(pool, 2, 1000, min_reputation=0.2)
    # a is cheapest; b shares a's operator and c a's /24, so d (fresh operator and subnet) comes next
    assert [c.node_id[0] for c in chosen] == ["a", "d"]
    chosen = place_shares(pool, 4, 1000, min_reputation=0.2)
    assert len({c.node_id for c in chosen}) == 4 and chosen[0].node_id[0] == "a"
    assert {c.node_id[0] for c in place_shares(pool, 2, 1000, exclude={"a" * 64}, min_reputation=0.2)} == {"b", "c"}
    with pytest.raises(PolicyError) as info:
        place_shares(pool, 6, 1000, min_reputation=0.2)
    assert info.value.status == 503 and "2 missing" in str(info.value)
    # the message says why the other nodes could not take a share, in words an operator can act on
    assert "7 known: 1 offline, 1 reputation too low, 1 full (less than 0.00 MiB free)" in str(info.value)
    with pytest.raises(PolicyError) as info:
        place_shares(pool, 3, 2**30, exclude={"a" * 64}, min_reputation=0.2)
    assert ("7 known: 1 offline, 1 already used or failed for this object, 1 reputation too low, 4 full (less "
            "than 1024.00 MiB free)") in str(info.value)
    # host names have no known subnet; empty operators never collide
    named = [cand(x, 5, "", f"{x}.example") for x in "xyz"]
    assert len(place_shares(named, 3, 1)) == 3


def test_redundancy_floor() -> None:
    check_redundancy(ObjectLayout(10_000, 4096, 3, 6), 2.0)
    with pytest.raises(PolicyError) as info:
        check_redundancy(ObjectLayout(10_000, 4096, 3, 5), 2.0)
    assert info.value.status == 422 and "n >= 6" in str(info.value)


def test_pricing_schemes() -> None:
    market = MarketView((100, 300, 200), 1000, 250)
    assert pricing_scheme("fixed:150").node_price(None, market) == 150
    assert pricing_scheme("fixed:150").node_price(400, market) == 400
    lowest = pricing_scheme("lowest_ask")
    assert lowest.node_price(120, market) == 120 and lowest.node_price(None, market) == 200
    floating = pricing_scheme("floating")
    assert floating.client_price(market) == int(200 * 2.5) and floating.node_price(None, market) == 500
    for bad in ("fixed", "auction", "lowest_ask:3"):
        with pytest.raises(ConfigError):
            pricing_scheme(bad)
    assert pricing_scheme("fixed:0").client_price(market) == 0
    assert pricing_scheme(f"fixed:{10**15}").client_price(market) == 10**15


@pytest.mark.parametrize("price", [str(10**15 + 1), "9" * 30, "9" * 5000])
def test_a_fixed_price_no_message_can_carry_is_refused_at_start(price: str) -> None:
    """Taken, a price above the 64-bit range made every /v1/info answer fail with 500 (and a price beyond any
    node's ask, 10^15, is surely a typo); thousands of digits made int() itself fail with a traceback."""
    with pytest.raises(ConfigError, match=r"MEDIATORD_PRICING=.*in 0\.\.1000000000000000 msat .*e\.g\. fixed:1000"):
        pricing_scheme(f"fixed:{price}")


def test_acceptance_rules() -> None:
    me, other = "a" * 64, "b" * 64
    acceptance_rule("open").admit(me, 10**12)
    acceptance_rule(f"allow:{me}").admit(me, 1)
    with pytest.raises(ForbiddenError):
        acceptance_rule(f"allow:{me}").admit(other, 1)
    with pytest.raises(ForbiddenError):
        acceptance_rule(f"deny:{other}").admit(other, 1)
    assert acceptance_rule("min_reputation:0.6").min_reputation == 0.6
    with pytest.raises(ForbiddenError):
        acceptance_rule("capacity_cap:1000").admit(me, 1001)
    for bad in ("allow:xyz", "min_reputation:2", "capacity_cap:lots", "everyone"):
        with pytest.raises(ConfigError):
            acceptance_rule(bad)


@pytest.mark.parametrize("spec,said", [
    ("allow:xyz", "MEDIATORD_ACCEPT_NODES='allow:xyz': the list must hold 64-hex ids"),
    ("deny:" + "A" * 64, "MEDIATORD_ACCEPT_NODES='deny:AAAA"),
    ("allow:", "MEDIATORD_ACCEPT_NODES='allow:' names no id"), ("allow:,", "names no id"),
    ("capacity_cap:" + "9" * 5000, "capacity_cap needs a number of bytes, e.g. capacity_cap:")])
def test_a_bad_acceptance_list_is_refused_naming_its_setting(spec: str, said: str) -> None:
    """A malformed id list did not say which setting held it; an empty allow list admitted nobody at all, which
    is what a template's empty value gives, not a policy; thousands of digits failed inside int()."""
    with pytest.raises(ConfigError) as info:
        acceptance_rule(spec, "MEDIATORD_ACCEPT_NODES")
    assert said in str(info.value)


def test_settings_for_the_mediator() -> None:
    settings = MediatorSettings.from_env({"MEDIATORD_PRICING": "fixed:1000", "MEDIATORD_DISQUALIFY_AFTER": "5",
                                          "MEDIATORD_AUDIT_PERIOD": "0.5"}, home=Path("/nonexistent"))
    assert settings.disqualify_after == 5 and settings.audit_period == 0.5 and settings.pricing == "fixed:1000"
    with pytest.raises(ConfigError):
        MediatorSettings.from_env({"MEDIATORD_AUDIT_PERIOD": "0.1"}, home=Path("/nonexistent"))


def _encoded_shares(layout: ObjectLayout) -> list[bytes]:
    from fincryptfs.core.erasure import encode_segment
    shares = [bytearray() for _ in range(layout.n)]
    for seg in range(layout.segment_count):
        for i, block in enumerate(encode_segment(layout.params, os.urandom(layout.sealed_length(seg)))):
            shares[i] += block
    return [bytes(s) for s in shares]


def test_redundancy_below_the_minimum_expansion_is_repaired() -> None:
    one_of_two = ObjectLayout(100_000, 8192, 1, 2)
    assert plan_repair(one_of_two, [0], repair_threshold(one_of_two, 2.0)).action == "repair"  # one copy left
    two_of_four = ObjectLayout(100_000, 8192, 2, 4)
    assert plan_repair(two_of_four, [0, 1, 2], repair_threshold(two_of_four, 2.0)).action == "repair"  # 1.5x
    three_of_eight = ObjectLayout(100_000, 8192, 3, 8)
    assert plan_repair(three_of_eight, range(7), repair_threshold(three_of_eight, 2.0)).action == "none"  # 2.33x
    assert plan_repair(three_of_eight, range(6), repair_threshold(three_of_eight, 2.0)).action == "repair"
    old = ObjectLayout(100_000, 8192, 3, 5)  # placed when the minimum was lower: whole, it is left alone
    assert plan_repair(old, range(5), repair_threshold(old, 2.0)).action == "none"


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(st.integers(1, n - 1), st.just(n), st.integers(0, n))),
       st.sampled_from([2.0, 2.2, 2.5, 3.0, 4.0]))
def test_repair_decision_matches_its_rule(knh: tuple[int, int, int], min_expansion: float) -> None:
    """Repair iff k <= healthy < n and (healthy < n - 1, or healthy / k < the minimum expansion, or healthy <= k)."""
    k, n, healthy = knh
    layout = ObjectLayout(1_000_000, 65536, k, n)
    action = plan_repair(layout, range(healthy), repair_threshold(layout, min_expansion)).action
    if healthy < k:
        assert action == "irreparable"
    elif healthy < n and (healthy < n - 1 or healthy / k < min_expansion or healthy <= k):
        assert action == "repair"
    else:
        assert action == "none"


def test_repair_rebuilds_exact_shares_without_a_key() -> None:
    layout = ObjectLayout(3 * 4096 + 7, 4096, 3, 6)
    shares = _encoded_shares(layout)
    rebuilt = rebuild_shares(layout, {1: shares[1], 4: shares[4], 5: shares[5]}, [0, 2, 3])
    assert {i: shares[i] for i in (0, 2, 3)} == rebuilt
    damaged = bytearray(shares[4])
    damaged[3] ^= 1  # a corrupt source gives a share whose root differs (the new node refuses to store it)
    wrong = rebuild_shares(layout, {1: shares[1], 4: bytes(damaged), 5: shares[5]}, [0])[0]
    assert MerkleTree.from_data(wrong).root != MerkleTree.from_data(shares[0]).root
    with pytest.raises(ErasureError):
        rebuild_shares(layout, {1: shares[1]}, [0])
    assert plan_repair(layout, [0, 1, 2, 3, 4], 5).action == "none"
    assert plan_repair(layout, [0, 1, 2, 3], 5).action == "repair"
    assert plan_repair(layout, [0, 1], 5).action == "irreparable"
    assert plan_repair(layout, [0, 1, 2, 3, 4], 5, evict=True).missing == (5,)
    assert leaf_count(layout.share_size) >= 1


PURE = ["audit.py", "placement.py", "repair.py", "policies/__init__.py", "policies/pricing.py",
        "policies/acceptance.py"]


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_do_no_io(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "mediatord" / name
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not imported & {"trio", "httpx", "sqlite3", "hypercorn", "socket", "asyncio"}


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 9 * 4096), st.sampled_from([(2, 4), (3, 6), (1, 3)]), st.integers(1, 40_000),
       st.data())
def test_repair_in_steps_equals_repair_in_one_go(size: int, kn: tuple[int, int], step: int,
                                                  data: st.DataObject) -> None:
    """Any step size tiles the shares exactly, and rebuilding step by step gives the whole shares' bytes."""
    k, n = kn
    layout = ObjectLayout(size, 4096, k, n)
    shares = _encoded_shares(layout)
    sources = data.draw(st.lists(st.sampled_from(range(n)), min_size=k, max_size=k, unique=True))
    wanted = [i for i in range(n) if i not in sources]
    batches = segment_batches(layout, step)
    assert [seg for batch in batches for seg in batch] == list(range(layout.segment_count))
    out = {i: b"" for i in wanted}
    at = 0
    for batch in batches:
        start, end = share_range(layout, batch)
        assert start == at and (len(batch) == 1 or end - start <= step)
        at = end
        for i, piece in rebuild_range(layout, {s: shares[s][start:end] for s in sources}, batch, wanted).items():
            out[i] += piece
    assert at == layout.share_size
    assert out == {i: shares[i] for i in wanted}


def test_credits_waiting_for_charges_are_noted_once_when_they_start_and_once_when_paid() -> None:
    from mediatord.billing import CreditReport, credit_wait_note
    waiting, notes = False, []
    for deferred in (0, 5, 5, 3, 0, 0, 2):
        report = CreditReport(credited=1, amount=10, deferred=deferred, available=64_424)
        notes.append(credit_wait_note(waiting, report))
        waiting = deferred > 0
    assert notes[0] is None and notes[2] is None and notes[3] is None and notes[5] is None
    assert notes[1] is not None and "5 audit pass(es) wait for credit" in notes[1] and "64424 msat" in notes[1]
    assert notes[4] == "audit passes that waited for credit are credited"
    assert notes[6] is not None and notes[6].startswith("2 audit pass(es)")


def test_loss_reports_schedule_an_audit_when_a_run_reports_more_losses() -> None:
    reports = audit.LossReports()
    node = "a" * 64
    seen = [reports.note(node, boot, count) for boot, count in
            [("b1" * 8, 0), ("b1" * 8, 2), ("b1" * 8, 2), ("b1" * 8, 3), ("b2" * 8, 0), ("b3" * 8, 1), (None, 9)]]
    assert seen == [False, True, False, True, False, True, False]
    assert reports.note("c" * 64, "b1" * 8, 5)  # a node first heard of with losses: worth an audit
