"""Secure aggregation (common.secagg): correctness, dropouts, aborts, tampering, privacy."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from common.core.config import load_config
from common.core.errors import ConfigError, SecAggError
from common.identity.certs import ephemeral_federation
from common.secagg import (
    AggregateResult,
    Credentials,
    Identity,
    KeyAdvert,
    MaskedUpload,
    MaskRequest,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    TrustAnchor,
    UnmaskRequest,
    crypto,
    shamir,
    simulate_round,
)
from common.secagg.graph import build_graph
from common.secagg.quantize import Quantizer

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SESSION = b"run-under-test"


@functools.cache
def _federation(size: int = 80) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]]:
    """One in-memory identity CA and ``size`` site identities (made once: 2 ms each)."""
    fed = ephemeral_federation([f"site-{i}" for i in range(size)])
    return fed.ca_cert, tuple(fed.identities[f"site-{i}"] for i in range(size))


def creds(sites: Iterable[int]) -> dict[int, Credentials]:
    """Credentials for each site id (ids below 80 map to identities one to one)."""
    ca, identities = _federation()
    anchor = TrustAnchor.from_pem(ca)
    return {s: Credentials(Identity.from_pem(*identities[s]), anchor) for s in sites}


def _sim(updates: dict[int, np.ndarray], params: SecAggParams, **kwargs: Any) -> AggregateResult:
    return simulate_round(updates, params, creds(updates), session=SESSION, **kwargs)


def _updates(n: int, dim: int, clip: float, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {10 + 5 * i: rng.uniform(-clip, clip, dim).astype(np.float32) for i in range(n)}


def _plain_sum(updates: dict[int, np.ndarray], sites: list[int]) -> np.ndarray:
    return np.sum([updates[s].astype(np.float64) for s in sites], axis=0)


def _check_sum(updates: dict[int, np.ndarray], result) -> None:  # type: ignore[no-untyped-def]
    error = np.abs(result.total - _plain_sum(updates, result.contributors)).max()
    assert error <= result.error_bound * (1 + 1e-9) + 1e-12


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[SecAggParams, dict[int, np.ndarray]]:
    n = draw(st.integers(2, 9))
    k = draw(st.sampled_from([0, 2, 4, 6]).filter(lambda k: k < n - 1))  # else complete: 0
    holders = n if k == 0 else k + 1  # t must be a strict majority of them
    t = draw(st.integers(max(2, holders // 2 + 1), max(2, holders)))
    params = SecAggParams(
        threshold=t,
        neighbours=k,
        modulus_bits=draw(st.sampled_from([16, 24, 32, 48, 64])),
        clip_range=draw(st.sampled_from([0.01, 1.0, 50.0])),
        stochastic_rounding=draw(st.booleans()),
    )
    return params, _updates(
        n, draw(st.integers(1, 16)), params.clip_range, draw(st.integers(0, 99))
    )


@FAST
@given(_rounds())
def test_masked_sum_equals_plain_sum_within_bound(case: tuple[SecAggParams, dict]) -> None:
    params, updates = case
    result = _sim(updates, params, round_id=3)
    assert result.contributors == sorted(updates)
    _check_sum(updates, result)


@FAST
@given(st.integers(3, 8), st.data())
def test_dropouts_at_any_stage_up_to_n_minus_t(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(n // 2 + 1, n))
    updates = _updates(n, 5, 1.0, n)
    sites = sorted(updates)
    dropped = data.draw(st.lists(st.sampled_from(sites), unique=True, max_size=n - t))
    stages = {s: data.draw(st.integers(0, 2)) for s in dropped}
    result = _sim(updates, SecAggParams(threshold=t), drop_after_stage=stages)
    assert result.contributors == [s for s in sites if stages.get(s, 3) >= 2]
    assert result.absent == [s for s in sites if stages.get(s, 3) == 1]
    _check_sum(updates, result)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_sparse_graph_tolerates_dropouts(stage: int) -> None:
    updates = _updates(12, 8, 1.0, stage)
    drops = {site: stage for site in list(updates)[:3]}
    params = SecAggParams(threshold=4, neighbours=6)
    result = _sim(updates, params, drop_after_stage=drops)
    assert len(result.contributors) == 12 - 3 * (stage < 2)
    _check_sum(updates, result)


def test_mixed_dropouts_pair_masks_of_a_dropped_uploader_are_removed() -> None:
    # A site drops before uploading, one of its neighbours after uploading: the pair key of the
    # two is rebuilt from the uploader's holders, no live help from either is needed.
    updates = _updates(6, 10, 1.0, 1)
    a, b, *_ = sorted(updates)
    result = _sim(updates, SecAggParams(threshold=4), drop_after_stage={a: 1, b: 2})
    assert b in result.contributors and a in result.absent
    _check_sum(updates, result)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_too_few_survivors_aborts(stage: int) -> None:
    updates = _updates(5, 4, 1.0, 0)
    drops = {site: stage for site in list(updates)[:3]}
    with pytest.raises(SecAggError, match=r"`threshold`|signed the survivor lists, 3 needed"):
        _sim(updates, SecAggParams(threshold=3), drop_after_stage=drops)


class _Round:
    """A round driven by hand, up to the unmask requests, to tamper with messages."""

    def __init__(
        self,
        n: int = 4,
        t: int = 3,
        round_id: int = 1,
        dim: int = 6,
        masked: bool = True,
        signed: bool = True,
    ) -> None:
        self.params = SecAggParams(threshold=t)
        self.updates = _updates(n, dim, 1.0, round_id)
        self.server = SecAggServer(self.params, round_id, self.updates, session=SESSION)
        self.creds = creds(self.updates)
        self.clients = {
            s: SecAggClient(s, self.params, round_id, self.creds[s], SESSION) for s in self.updates
        }
        adverts = {s: c.advertise() for s, c in self.clients.items()}
        self.mask_request = self.server.mask_request(adverts)
        self.uploads: dict[int, MaskedUpload] = {}
        if not masked:
            return
        for s, c in self.clients.items():
            self.uploads[s] = c.mask(self.updates[s], self.mask_request)
            self.server.add_upload(self.uploads[s])
        self.lists = self.server.consistency_request()
        if not signed:
            return
        self.signatures = {s: c.sign_survivors(self.lists) for s, c in self.clients.items()}
        self.requests = self.server.unmask_requests(self.signatures)


def test_tampered_share_is_detected() -> None:
    rnd = _Round()
    site, request = next(iter(rnd.requests.items()))
    sender = next(iter(request.shares))
    blob = bytearray(request.shares[sender])
    blob[-20] ^= 1
    tampered = dataclasses.replace(request, shares={**request.shares, sender: bytes(blob)})
    with pytest.raises(SecAggError, match="authentication"):
        rnd.clients[site].unmask(tampered)


def test_replayed_or_rerouted_share_is_detected() -> None:
    old, new = _Round(round_id=1), _Round(round_id=2)
    site, request = next(iter(new.requests.items()))
    sender = next(iter(request.shares))
    other = next(s for s in request.shares if s != sender)
    # A share from another round, and a share of the right round sent by another sender.
    for blob in (old.requests[site].shares[sender], request.shares[other]):
        forged = dataclasses.replace(request, shares={**request.shares, sender: blob})
        with pytest.raises(SecAggError, match="authentication"):
            SecAggClient.from_bytes(new.clients[site].to_bytes()).unmask(forged)


def test_corrupt_revealed_share_fails_the_commitment() -> None:
    rnd = _Round()
    replies = {s: rnd.clients[s].unmask(r) for s, r in rnd.requests.items()}
    site = next(iter(replies))
    shares = dict(replies[site].self_shares)
    shares[site] = (int.from_bytes(shares[site], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")
    replies[site] = dataclasses.replace(replies[site], self_shares=shares)
    with pytest.raises(SecAggError, match=r"corrupt|inconsistent"):
        rnd.server.finish(replies)


def test_client_refuses_to_reveal_both_kinds_for_one_peer() -> None:
    rnd = _Round(signed=False)
    site = rnd.lists.survivors[0]
    peer = rnd.lists.survivors[1]
    both = dataclasses.replace(rnd.lists, absent=[*rnd.lists.absent, peer])
    with pytest.raises(SecAggError, match="survivor and absent"):
        rnd.clients[site].sign_survivors(both)


@pytest.mark.parametrize("change", ["unknown_site", "too_few", "missing_me"])
def test_client_refuses_to_sign_lists_it_cannot_accept(change: str) -> None:
    rnd = _Round(n=5, t=4, signed=False)
    site, lists = rnd.lists.survivors[0], rnd.lists
    if change == "unknown_site":
        bad = dataclasses.replace(lists, survivors=[*lists.survivors, 999])
    elif change == "too_few":  # three survivors < t = 4
        bad = dataclasses.replace(lists, survivors=lists.survivors[:3], absent=lists.survivors[3:])
    else:
        bad = dataclasses.replace(lists, survivors=lists.survivors[1:], absent=[site])
    with pytest.raises(SecAggError):
        rnd.clients[site].sign_survivors(bad)
    assert rnd.clients[site].stage == "masked"  # nothing signed


def test_client_signs_one_pair_of_lists_per_round_and_unmasks_only_for_it() -> None:
    rnd = _Round(n=5, t=3)
    site, request = next(iter(rnd.requests.items()))
    with pytest.raises(SecAggError, match="stage"):
        rnd.clients[site].sign_survivors(rnd.lists)  # a second signature: never
    other = sorted(rnd.lists.survivors)[-1]
    moved = dataclasses.replace(
        request,
        survivors=[s for s in request.survivors if s != other],
        absent=[*request.absent, other],
    )
    with pytest.raises(SecAggError, match="other survivor lists than the ones it signed"):
        SecAggClient.from_bytes(rnd.clients[site].to_bytes()).unmask(moved)


@pytest.mark.parametrize("change", ["too_few", "forged", "other_lists", "non_survivor"])
def test_client_reveals_nothing_without_enough_signatures_of_its_own_lists(change: str) -> None:
    rnd = _Round(n=5, t=3)
    site, request = next(iter(rnd.requests.items()))
    sigs = dict(request.signatures)
    others = [s for s in sorted(sigs) if s != site]
    if change == "too_few":  # 2 of 5: t = 3 and a majority of 5 are needed
        sigs = {s: sigs[s] for s in others[:2]}
    elif change == "forged":
        sigs[others[0]] = sigs[others[1]]
    elif change == "other_lists":  # a genuine signature, over lists the site was not shown
        lists = dataclasses.replace(rnd.lists, survivors=rnd.lists.survivors[:4])
        lists = dataclasses.replace(lists, absent=rnd.lists.survivors[4:])
        view = bytes.fromhex(json.loads(rnd.clients[others[0]].to_bytes())["view"])
        identity = rnd.creds[others[0]].identity
        sigs[others[0]] = identity.sign(lists.statement(SESSION, view))
    else:
        sigs[999] = sigs[others[0]]
    bad = dataclasses.replace(request, signatures=sigs)
    with pytest.raises(SecAggError, match="signed|signature"):
        SecAggClient.from_bytes(rnd.clients[site].to_bytes()).unmask(bad)


@pytest.mark.parametrize("change", ["drop_survivor", "unknown_site", "extra_share", "too_few"])
def test_client_refuses_inconsistent_survivor_lists(change: str) -> None:
    rnd = _Round(n=5, t=4)
    site, request = next(iter(rnd.requests.items()))
    peer = next(s for s in request.survivors if s != site)
    if change == "drop_survivor":  # claims a peer is gone, yet its share to us was delivered
        bad = dataclasses.replace(request, survivors=[s for s in request.survivors if s != peer])
        bad = dataclasses.replace(bad, absent=[*bad.absent, peer])
    elif change == "unknown_site":
        bad = dataclasses.replace(request, survivors=[*request.survivors, 999])
    elif change == "extra_share":
        bad = dataclasses.replace(request, shares={**request.shares, 999: b"x" * 60})
    else:  # server withholds two peers: three survivors < t = 4
        gone = [s for s in request.survivors if s != site][:2]
        shares = {s: b for s, b in request.shares.items() if s not in gone}
        survivors = [s for s in request.survivors if s not in gone]
        bad = UnmaskRequest(request.round_id, survivors, [*request.absent, *gone], shares)
    with pytest.raises(SecAggError):
        rnd.clients[site].unmask(bad)


def test_client_answers_unmask_only_once() -> None:
    rnd = _Round()
    site, request = next(iter(rnd.requests.items()))
    rnd.clients[site].unmask(request)
    with pytest.raises(SecAggError, match="stage"):
        rnd.clients[site].unmask(request)


def test_masked_vector_is_uniform_for_a_constant_update() -> None:
    params = SecAggParams(threshold=2, stochastic_rounding=False)
    updates = {s: np.zeros(40_000, np.float32) for s in (1, 2, 3)}
    server = SecAggServer(params, 0, updates)
    clients = {s: SecAggClient(s, params, 0, c) for s, c in creds(updates).items()}
    request = server.mask_request({s: c.advertise() for s, c in clients.items()})
    masked = clients[1].mask(updates[1], request).masked
    encoded = Quantizer(params, 3).encode(updates[1])
    assert np.unique(encoded).size == 1  # without masks the server would see a constant
    for byte in (masked >> 24, masked & 0xFF):  # high and low 8 bits, 256 bins
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_state_round_trips_through_bytes() -> None:
    rnd = _Round()
    site = next(iter(rnd.requests))
    restored = SecAggClient.from_bytes(rnd.clients[site].to_bytes())
    assert restored.stage == "signed" and restored.to_bytes() == rnd.clients[site].to_bytes()
    fresh = SecAggClient(5, rnd.params, 1, creds([5])[5])
    assert SecAggClient.from_bytes(fresh.to_bytes()).advertise().same_keys(fresh.advertise())
    with pytest.raises(SecAggError, match="corrupt"):
        SecAggClient.from_bytes(b"{not json")


def test_messages_hold_only_flower_record_types() -> None:
    rnd = _Round()
    replies = {s: rnd.clients[s].unmask(r) for s, r in rnd.requests.items()}
    messages = [rnd.mask_request, *rnd.uploads.values(), *rnd.requests.values(), *replies.values()]
    messages += [rnd.lists, *rnd.signatures.values()]
    messages.append(KeyAdvert(1, b"a" * 32, b"b" * 32))
    scalar = (int, float, str, bytes, bool)
    for message in messages:
        for value in message.to_dict().values():
            assert isinstance(value, scalar) or all(isinstance(v, scalar) for v in value)
    result = rnd.server.finish(replies)
    _check_sum(rnd.updates, result)


def test_invalid_params_name_every_field() -> None:
    with pytest.raises(SecAggError) as info:
        SecAggParams(threshold=1, neighbours=3, modulus_bits=4, clip_range=-1.0)
    for name in ("threshold", "neighbours", "modulus_bits", "clip_range"):
        assert f"`{name}`" in str(info.value)


def test_modulus_too_small_for_the_number_of_sites() -> None:
    with pytest.raises(SecAggError, match="modulus_bits"):
        _ = Quantizer(SecAggParams(threshold=2, modulus_bits=8), 300).levels


def test_shamir_any_t_shares_rebuild_and_fewer_refuse() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [0, 4, 9, 100], 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({h: shares[h] for h in subset}, 3) == secret
    with pytest.raises(SecAggError, match="need 3"):
        shamir.combine({0: shares[0], 4: shares[4]}, 3)


def test_sparse_graph_is_k_regular_and_symmetric() -> None:
    graph = build_graph(list(range(20)), 6, b"seed")
    assert all(len(peers) == 6 and site not in peers for site, peers in graph.items())
    assert all(site in graph[peer] for site, peers in graph.items() for peer in peers)
    assert build_graph(list(range(20)), 6, b"other") != graph


@pytest.mark.parametrize(("bits", "sites"), [(64, 2), (33, 2), (16, 9), (8, 2)])
def test_extreme_values_never_wrap(bits: int, sites: int) -> None:
    params = SecAggParams(threshold=sites // 2 + 1, modulus_bits=bits, clip_range=1.0)
    updates = {s: np.array([1.0, -1.0, 1.0, 0.999], np.float32) for s in range(sites)}
    result = _sim(updates, params)
    _check_sum(updates, result)


def test_a_threshold_of_half_the_holders_is_refused_by_server_and_sites() -> None:
    # t = 2 of 4: the coordinator could show two stories to two pairs of sites (issue 13).
    params = SecAggParams(threshold=2)
    clients = {s: SecAggClient(s, params, 0, c) for s, c in creds(range(4)).items()}
    adverts = {s: c.advertise() for s, c in clients.items()}
    with pytest.raises(SecAggError, match=r"`threshold` 2 is not more than half of the 4"):
        SecAggServer(params, 0, adverts).mask_request(adverts)
    request = MaskRequest(0, adverts)  # a server that skips its own check
    with pytest.raises(SecAggError, match=r"site 1: `threshold` 2 is not more than half"):
        clients[1].mask(np.zeros(3, np.float32), request)


def test_sparse_threshold_must_be_a_majority_of_the_neighbourhood() -> None:
    with pytest.raises(SecAggError) as info:
        SecAggParams(threshold=3, neighbours=6)
    assert "`threshold` (3)" in str(info.value) and "`neighbours` + 1 = 7" in str(info.value)
    SecAggParams(threshold=4, neighbours=6)  # 4 of 7


@pytest.mark.parametrize(
    ("override", "field"),
    [("secagg.threshold=0.5", "secagg.threshold"), ("secagg.neighbours=3", "secagg.neighbours")],
)
def test_config_asking_for_less_than_a_majority_is_refused(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"`{field}`: must be"):
        load_config(None, [override])
    assert load_config(None, ["secagg.threshold=0.51"]).secagg.threshold == 0.51


def _forged(rnd: _Round, victim: int, how: str) -> KeyAdvert:
    """The advert of site ``victim`` as a dishonest coordinator would relay it."""
    real = rnd.mask_request.adverts[victim]
    fake_c, fake_s = b"\x09" * 32, b"\x0a" * 32  # keys whose secrets the coordinator knows
    if how == "unsigned":
        return dataclasses.replace(real, c_public=fake_c, s_public=fake_s, signature=b"")
    if how == "own-ca":  # the coordinator's own CA and a site identity it issued itself
        fed = ephemeral_federation(["site-fake"])
        mine = Identity.from_pem(*fed.identities["site-fake"])
        unsigned = KeyAdvert(victim, fake_c, fake_s, mine.cert_der)
        return dataclasses.replace(
            unsigned, signature=mine.sign(unsigned.statement(SESSION, 1, rnd.params.digest()))
        )
    if how == "keys-swapped":  # the real certificate and signature, other keys
        return dataclasses.replace(real, c_public=fake_c, s_public=fake_s)
    other = next(s for s in rnd.clients if s != victim)
    if how == "replayed":  # another site's genuine advert relayed under this site's id
        return dataclasses.replace(rnd.mask_request.adverts[other], site_id=victim)
    # "other-round": the victim's genuine signature of round 2, relayed in round 1
    later = SecAggClient(victim, rnd.params, 2, rnd.creds[victim], SESSION)
    return later.advertise()


@pytest.mark.parametrize("how", ["unsigned", "own-ca", "keys-swapped", "replayed", "other-round"])
def test_a_site_refuses_a_round_with_an_advert_no_certified_site_signed(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    rnd = _Round(n=4, t=3, round_id=1, masked=False)
    victim, honest = sorted(rnd.clients)[:2]
    adverts = {**rnd.mask_request.adverts, victim: _forged(rnd, victim, how)}
    request = dataclasses.replace(rnd.mask_request, adverts=adverts)
    with (
        caplog.at_level("ERROR", logger="common.secagg.client"),
        pytest.raises(SecAggError, match=f"key advert of site {victim}"),
    ):
        rnd.clients[honest].mask(rnd.updates[honest], request)
    assert f"site {honest}: the key advert of site {victim}" in caplog.text
    assert "refusing" in caplog.text
    anchor = rnd.creds[honest].anchor  # an honest coordinator with the CA drops it too
    server = SecAggServer(rnd.params, 1, rnd.updates, session=SESSION, anchor=anchor)
    with pytest.raises(SecAggError):
        server.check_advert(adverts[victim])


def test_a_site_refuses_two_adverts_of_one_identity() -> None:
    # A dishonest site (it holds its key) signs a second advert to take two seats.
    rnd = _Round(n=4, t=3, round_id=1, masked=False)
    a, b, honest = sorted(rnd.clients)[:3]
    second = SecAggClient(b, rnd.params, 1, rnd.creds[a], SESSION).advertise()
    request = dataclasses.replace(rnd.mask_request, adverts={**rnd.mask_request.adverts, b: second})
    with pytest.raises(SecAggError, match="signed by one identity"):
        rnd.clients[honest].mask(rnd.updates[honest], request)


def test_sites_given_different_parameters_never_form_one_round() -> None:
    # Site 0 is told t = 4, the others t = 3: its signed parameters differ, its advert fails.
    rnd = _Round(n=4, t=3, round_id=1, masked=False)
    odd = sorted(rnd.clients)[0]
    stricter = SecAggParams(threshold=4)
    client = SecAggClient(odd, stricter, 1, rnd.creds[odd], SESSION)
    adverts = {**rnd.mask_request.adverts, odd: client.advertise()}
    request = dataclasses.replace(rnd.mask_request, adverts=adverts)
    honest = sorted(rnd.clients)[1]
    with pytest.raises(SecAggError, match=f"key advert of site {odd} is not signed"):
        rnd.clients[honest].mask(rnd.updates[honest], request)


class _SparseRound:
    """SecAgg+ with 8 sites, k = 4, t = 3: up to the seed reveals."""

    def __init__(self) -> None:
        self.params = SecAggParams(threshold=3, neighbours=4)
        self.updates = _updates(8, 4, 1.0, 5)
        self.server = SecAggServer(self.params, 1, self.updates, session=SESSION)
        self.creds = creds(self.updates)
        self.clients = {
            s: SecAggClient(s, self.params, 1, self.creds[s], SESSION) for s in self.updates
        }
        self.adverts = {s: c.advertise() for s, c in self.clients.items()}
        seed_request = self.server.seed_request(self.adverts)
        assert seed_request is not None
        self.seed_request = seed_request
        self.reveals = {s: c.reveal_seed(seed_request) for s, c in self.clients.items()}


def test_sparse_graph_seed_hashes_every_sites_committed_share() -> None:
    rnd = _SparseRound()
    request = rnd.server.mask_request(rnd.adverts, rnd.reveals)
    assert set(request.reveals) == set(rnd.adverts)
    for site, share in request.reveals.items():  # each share opens its signed commitment
        assert crypto.commit(b"graph-seed", share) == rnd.adverts[site].seed_commit
    other = _SparseRound()  # fresh shares: another graph (the coordinator chose neither)
    again = other.server.mask_request(other.adverts, other.reveals)
    assert request.graph_seed(SESSION) != again.graph_seed(SESSION)
    uploads = [c.mask(rnd.updates[s], request) for s, c in rnd.clients.items()]
    assert all(len(u.shares) == 4 for u in uploads)  # k neighbours each


def test_the_coordinator_cannot_drop_a_revealer_or_change_the_committed_set() -> None:
    rnd = _SparseRound()
    victim, honest = sorted(rnd.adverts)[:2]
    with pytest.raises(SecAggError, match=f"site {victim} did not open its graph-seed"):
        rnd.server.mask_request(rnd.adverts, {s: r for s, r in rnd.reveals.items() if s != victim})
    shares = {s: r.seed for s, r in rnd.reveals.items()}
    fewer = {s: a for s, a in rnd.adverts.items() if s != victim}
    regrind = MaskRequest(1, fewer, {s: v for s, v in shares.items() if s != victim})
    with pytest.raises(SecAggError, match="differ from the set this site revealed"):
        rnd.clients[honest].mask(rnd.updates[honest], regrind)
    forged = MaskRequest(1, rnd.adverts, {**shares, victim: b"\x00" * 32})
    with pytest.raises(SecAggError, match=f"site {victim}'s seed share does not open"):
        rnd.clients[honest].mask(rnd.updates[honest], forged)
    coordinator_seed = MaskRequest(1, rnd.adverts, {})  # the coordinator's graph, no reveals
    with pytest.raises(SecAggError, match="lacks some advertisers' shares"):
        rnd.clients[honest].mask(rnd.updates[honest], coordinator_seed)


def test_a_site_never_masks_on_a_sparse_graph_it_did_not_reveal_for() -> None:
    rnd = _SparseRound()
    fresh = SecAggClient(99, rnd.params, 1, creds([79])[79], SESSION)
    adverts = {**rnd.adverts, 99: fresh.advertise()}
    shares = {s: r.seed for s, r in rnd.reveals.items()}
    with pytest.raises(SecAggError, match="never revealed its seed share"):
        fresh.mask(np.zeros(4, np.float32), MaskRequest(1, adverts, shares))


def test_stochastic_rounding_is_unbiased_and_draws_from_the_csprng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("stochastic rounding used numpy's (non-cryptographic) generator")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    quantizer = Quantizer(SecAggParams(threshold=2, modulus_bits=16, clip_range=1.0), 2)
    value = 0.3 * quantizer.step - 1.0  # 0.3 of a level above the bottom
    codes = quantizer.encode(np.full(200_000, value))
    assert set(np.unique(codes)) == {0, 1}
    assert abs(codes.mean() - 0.3) < 0.005  # unbiased: E[code] = 0.3 levels
