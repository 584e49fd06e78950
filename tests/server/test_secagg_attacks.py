"""A dishonest coordinator against secure aggregation (issue 13): before and after.

Two attacks a review ran against the protocol as it was:

* **lying survivor lists at t = n/2**: t = 2 of 4, each honest site is told that only it and the
  victim survived, so each reveals the victim's self-mask share *and* its shares of the victim's
  pair keys with "absent" peers: enough of both to unmask the victim (1.8e-9 from its update).
* **fake adverts**: t = 2 of 3, the coordinator advertises two key pairs of its own next to one
  real site; the victim masks with, and shares its secrets to, the coordinator: recovered exactly.

``TodaysSite`` is the site with the checks it had before (its own advert relayed unchanged, the
lists consistent with the adverts it saw, the shares from exactly its surviving neighbours) and
none of the new ones: the attacks are run against it first (they succeed), then against the real
site, at the protocol level (common/secagg) and through the real ClientApp in process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message

import server.secagg_round as driver
from client.app import app as client_app
from client.secagg_site import PARAM_KEYS
from common.core.config import Config, build_config, load_config
from common.core.errors import RoundError, SecAggError
from common.identity.certs import ephemeral_federation
from common.protocol import keys
from common.secagg import (
    ConsistencyRequest,
    Credentials,
    Identity,
    KeyAdvert,
    MaskedUpload,
    MaskRequest,
    SecAggClient,
    SecAggParams,
    TrustAnchor,
    UnmaskReply,
    UnmaskRequest,
    crypto,
    shamir,
)
from common.secagg.client import reduce_mod
from common.secagg.quantize import Quantizer
from common.secagg.server import SecAggServer
from server.run import FederatedRun
from simulations.run import prepare
from tests.conftest import SCENARIOS
from tests.server.inprocess import InProcessGrid
from tests.server.test_secagg_round import give_identities

ROUND, SESSION, DIM = 1, b"attacked-run", 64


class TodaysSite(SecAggClient):
    """The site before issue 13: no signature, majority or consistency check (the "before")."""

    def _check_adverts(self, adverts: dict[int, KeyAdvert]) -> None:
        if not self.advertise().same_keys(adverts.get(self.site_id)):
            raise SecAggError("the server relayed a wrong advert for this site")

    def _check_unmask_request(self, request: UnmaskRequest) -> Any:
        self._expect_round(request.round_id)
        self._check_lists(request.survivors, request.absent)
        graph = self._graph()
        if set(request.shares) != graph[self.site_id] & set(request.survivors):
            raise SecAggError("shares are not from exactly the surviving neighbours")
        return graph


def federation(sites: list[int]) -> dict[int, Credentials]:
    fed = ephemeral_federation([f"site-{s}" for s in sites])
    anchor = TrustAnchor.from_pem(fed.ca_cert)
    return {s: Credentials(Identity.from_pem(*fed.identities[f"site-{s}"]), anchor) for s in sites}


def updates(sites: list[int]) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(13)
    return {s: rng.uniform(-1, 1, DIM).astype(np.float32) for s in sites}


def unmask_victim(
    victim: int,
    upload: MaskedUpload,
    seed: bytes,
    pair_keys: dict[int, bytes],
    params: SecAggParams,
    sites: int,
) -> np.ndarray:
    """What the coordinator computes once it holds the victim's self-mask seed and pair keys."""
    quantizer = Quantizer(params, sites)
    total = upload.masked.copy()
    key = crypto.derive(seed, b"self-mask", ROUND, victim)
    np.subtract(total, crypto.prg(key, DIM, quantizer.dtype), out=total)
    for peer, pair in pair_keys.items():
        op = np.subtract if victim < peer else np.add
        op(total, crypto.prg(pair, DIM, quantizer.dtype), out=total)
    return quantizer.decode_sum(reduce_mod(total, quantizer), 1)


def combine(replies: dict[int, UnmaskReply], pick: Any, t: int) -> bytes:
    shares = {h: pick(r) for h, r in replies.items() if pick(r) is not None}
    return shamir.combine(shares, t)


# -- attack 1: lying survivor lists ------------------------------------------------------------
def story(w: int, t: int, n: int) -> list[int]:
    """What site ``w`` is told survived: the victim (0), itself and the next t - 2 sites."""
    others = [(w - 1 + i) % (n - 1) + 1 for i in range(n - 1)]  # w first, then cyclically
    return sorted({0, *others[: t - 1]})


def lying_lists(site_cls: type[SecAggClient], t: int, n: int = 4) -> float:
    """Tell each honest site a different story of who survived; return how close the
    coordinator gets to the victim's (site 0's) update (max abs error)."""
    sites, victim = list(range(n)), 0
    params, data, creds = SecAggParams(threshold=t), updates(sites), federation(sites)
    clients = {s: site_cls(s, params, ROUND, creds[s], SESSION) for s in sites}
    request = MaskRequest(ROUND, {s: c.advertise() for s, c in clients.items()})  # no checks
    uploads = {s: c.mask(data[s], request) for s, c in clients.items()}
    replies: dict[int, UnmaskReply] = {}
    for w in sites[1:]:
        survivors = story(w, t, n)
        absent = [x for x in sites if x not in survivors]
        lists = ConsistencyRequest(ROUND, survivors, absent)
        signed = {w: clients[w].sign_survivors(lists).signature}
        routed = {v: uploads[v].shares[w] for v in survivors if v != w}
        replies[w] = clients[w].unmask(UnmaskRequest(ROUND, survivors, absent, routed, signed))
    seed = combine(replies, lambda r: r.self_shares.get(victim), t)
    pair_keys = {
        p: combine(replies, lambda r, p=p: r.pair_shares.get((victim, p)), t) for p in sites[1:]
    }
    got = unmask_victim(victim, uploads[victim], seed, pair_keys, params, n)
    return float(np.abs(got - data[victim]).max())


def test_lying_survivor_lists_at_half_unmasked_a_site_before() -> None:
    error = lying_lists(TodaysSite, t=2)
    assert error < 1e-6  # the victim's update, up to quantization
    print(f"\nbefore: lying lists at t = 2 of 4 recover the victim's update to {error:.2g}")


def test_lying_survivor_lists_at_half_now_abort_at_every_site(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(SecAggError, match="`threshold` 2 is not more than half of the 4"),
    ):
        lying_lists(SecAggClient, t=2)
    assert "refusing: site 0: `threshold` 2 is not more than half" in caplog.text


def test_lying_survivor_lists_above_half_fail_the_consistency_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # t = 3 of 5 is a majority; the lie is caught by the survivors' signatures as well.
    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(SecAggError, match="only 1 survivors signed the survivor lists, 3 needed"),
    ):
        lying_lists(SecAggClient, t=3, n=5)
    assert "no proof the other sites were shown the same lists" in caplog.text


# -- attack 2: fake adverts --------------------------------------------------------------------
def fake_adverts(site_cls: type[SecAggClient], coordinator_holds_ca: bool = False) -> float:
    """One real site (0) and two adverts of the coordinator's (1, 2) at t = 2 of 3."""
    params, sites, victim = SecAggParams(threshold=2), [0, 1, 2], 0
    if coordinator_holds_ca:  # the very CA the sites trust
        creds = federation(sites)
        real, own = creds[victim], {s: creds[s] for s in (1, 2)}
    else:  # the coordinator's own CA for its "sites"
        real, own = federation([victim])[victim], federation([1, 2])
    site = site_cls(victim, params, ROUND, real, SESSION)
    fakes = {s: TodaysSite(s, params, ROUND, own[s], SESSION) for s in (1, 2)}
    s_secrets = {s: bytes.fromhex(json.loads(f.to_bytes())["s_secret"]) for s, f in fakes.items()}
    adverts = {victim: site.advertise(), **{s: f.advertise() for s, f in fakes.items()}}
    request = MaskRequest(ROUND, adverts)
    data = updates(sites)[victim]
    uploads = {victim: site.mask(data, request)}  # all the attack needs from the victim
    uploads.update({s: f.mask(np.zeros(DIM, np.float32), request) for s, f in fakes.items()})
    replies = {}
    for s, fake in fakes.items():  # the coordinator runs its fakes: they open the victim's shares
        routed = {v: uploads[v].shares[s] for v in sites if v != s}
        replies[s] = fake.unmask(UnmaskRequest(ROUND, sites, [], routed))
    seed = combine(replies, lambda r: r.self_shares.get(victim), 2)
    victim_public = adverts[victim].s_public
    pair_keys = {
        s: crypto.agree(s_secrets[s], victim_public, b"pair-mask", ROUND, victim, s) for s in fakes
    }
    got = unmask_victim(victim, uploads[victim], seed, pair_keys, params, 3)
    return float(np.abs(got - data).max())


def test_fake_adverts_unmasked_a_site_before() -> None:
    error = fake_adverts(TodaysSite)
    assert error < 1e-6  # exact up to quantization
    print(f"\nbefore: two fake adverts at t = 2 of 3 recover the victim's update to {error:.2g}")


def test_fake_adverts_now_make_the_site_refuse(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(SecAggError, match="not issued by the federation's CA"),
    ):
        fake_adverts(SecAggClient)
    assert "site 0: the key advert of site 1" in caplog.text and "refusing" in caplog.text


def test_what_does_not_hold_a_coordinator_holding_the_identity_ca() -> None:
    # Signed adverts move the trust from the coordinator to the identity CA's holder: if the
    # coordinator also holds the CA key, it mints site identities and the attack works again.
    assert fake_adverts(SecAggClient, coordinator_holds_ca=True) < 1e-6


# -- the same attacks through the real ClientApp, in process -------------------------------------
@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict[int, dict], Path]:
    root = tmp_path_factory.mktemp("attacks")
    overrides = [
        "federation.rounds=1",
        "simulation.partition.num_sites=4",
        'evaluation.test_dir=""',
    ]
    cfg = prepare(load_config(SCENARIOS / "tiny.toml", overrides), root)
    secagg = cfg.secagg.model_copy(update={"enabled": True})
    fed = cfg.federation.model_copy(update={"round_timeout_s": 1.0, "min_sites": 2})
    cfg = cfg.model_copy(update={"secagg": secagg, "federation": fed})
    nodes = {
        200 + i: {"data-dir": str(root / "sites" / f"site-{i}"), "site-name": f"site-{i}"}
        for i in range(4)
    }
    return cfg, nodes, root


Fault = Callable[[InProcessGrid, int, Message], "Message | None"]


def run_attacked(setup: tuple[Config, dict[int, dict], Path], name: str, fault: Fault) -> None:
    cfg, nodes, root = setup
    grid = InProcessGrid(client_app, nodes, lambda n, m: fault(grid, n, m))
    give_identities(grid, nodes)  # each site's own identity, from a CA the coordinator lacks
    FederatedRun(cfg, root / name, grid).execute()


def deliver(grid: InProcessGrid, node: int, msg: Message) -> Message:
    """The real ClientApp's answer to a (rewritten) message; an exception is an error reply, as
    in Flower's engines."""
    try:
        return client_app(msg, grid.contexts[node])
    except Exception as err:
        return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def test_clientapp_sites_refuse_a_threshold_of_half(
    four_sites: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The patched coordinator asks for t = 2 of 4 and skips its own majority check.
    monkeypatch.setattr(driver, "threshold_for", lambda cfg, n: n // 2)

    def without_majority(self: SecAggServer, adverts: Any) -> None:
        for advert in adverts.values():
            self.check_advert(advert)

    monkeypatch.setattr(SecAggServer, "_check_adverts", without_majority)
    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(RoundError, match=r"round 1: 0 site\(s\) succeeded"),  # none masked
    ):
        run_attacked(four_sites, "half", lambda grid, node, msg: None)
    for site in range(4):
        assert f"site {site}: `threshold` 2 is not more than half of the 4" in caplog.text


def test_clientapp_sites_refuse_fake_adverts(
    four_sites: Any, caplog: pytest.LogCaptureFixture
) -> None:
    own = federation([1, 2])  # the coordinator's identities for its "sites" 1 and 2
    setup: dict[str, Any] = {}

    def inject(grid: InProcessGrid, node: int, msg: Message) -> Message | None:
        records = msg.content.config_records
        if keys.SETUP in records:  # the coordinator's own setup: remember the parameters
            setup.update(records[keys.SETUP])
            return None
        if keys.MASK_REQUEST not in records:
            return None
        request = MaskRequest.from_dict(records[keys.MASK_REQUEST])
        params = SecAggParams.from_dict({k: setup[k] for k in PARAM_KEYS})
        session = str(setup[keys.SESSION]).encode()
        adverts = dict(request.adverts)
        for s in (1, 2):  # well-formed, signed for this run and round, by the wrong CA
            adverts[s] = TodaysSite(s, params, request.round_id, own[s], session).advertise()
        forged = MaskRequest(request.round_id, adverts, request.reveals)
        msg.content[keys.MASK_REQUEST] = ConfigRecord(forged.to_dict())
        return deliver(grid, node, msg)

    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(RoundError, match=r"round 1: 0 site\(s\) succeeded"),  # none masked
    ):
        run_attacked(four_sites, "fake-adverts", inject)
    for site in (0, 3):
        assert f"site {site}: the key advert of site 1: identity certificate not issued" in (
            caplog.text
        )
    for site in (1, 2):
        assert f"site {site}: the server relayed a wrong advert for this site" in caplog.text


def test_clientapp_sites_refuse_inconsistent_survivor_lists(
    four_sites: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # t = 3 of 4. The patched coordinator tells each site a different peer is absent, forwards
    # the signatures it got, and checks none of them itself.
    monkeypatch.setattr(SecAggServer, "_peer", lambda self, site: _Trusting())
    signatures: dict[int, bytes] = {}

    def lie(grid: InProcessGrid, node: int, msg: Message) -> Message | None:
        records = msg.content.config_records
        site = node - 200
        gone = [(site + 1) % 4]
        told = [s for s in range(4) if s not in gone]
        if keys.SURVIVORS in records:
            msg.content[keys.SURVIVORS] = ConfigRecord(ConsistencyRequest(1, told, gone).to_dict())
            reply = deliver(grid, node, msg)
            if keys.SURVIVORS_SIGNED in reply.content.config_records:
                signed = reply.content.config_records[keys.SURVIVORS_SIGNED]
                signatures[site] = bytes(signed["signature"])  # type: ignore[arg-type]
            return reply
        if keys.UNMASK_REQUEST not in records:
            return None
        request = UnmaskRequest.from_dict(records[keys.UNMASK_REQUEST])
        shares = {s: b for s, b in request.shares.items() if s in told}
        sigs = {s: sig for s, sig in signatures.items() if s in told}
        lying = UnmaskRequest(request.round_id, told, gone, shares, sigs)
        msg.content[keys.UNMASK_REQUEST] = ConfigRecord(lying.to_dict())
        return deliver(grid, node, msg)

    with (
        caplog.at_level(logging.ERROR, logger="common.secagg.client"),
        pytest.raises(RoundError, match="secure aggregation aborted"),
    ):
        run_attacked(four_sites, "lying-lists", lie)
    refused = [
        site
        for site in range(4)
        if f"site {site}: the survivor lists of site" in caplog.text
        and "the coordinator showed sites different survivor lists" in caplog.text
    ]
    assert refused == [0, 1, 2, 3], caplog.text[-2000:]


class _Trusting:
    """A peer whose every signature 'verifies': the patched coordinator checks nothing."""

    name = "?"

    def verify(self, *args: object) -> None:
        return None


def test_clientapp_sites_refuse_a_quieter_noise_plan(
    four_sites: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Distributed noise: a coordinator that asks for a quarter of the noise (a plan whose digest
    it puts in the signed parameters itself, so every site sees the same lie) gets nothing:
    each site recomputes what its protection needs from its own values, refuses before it
    trains, and says why."""
    cfg, nodes, root = four_sites
    tree = cfg.model_dump(mode="json")
    tree["privacy"] = {"institution": {"enabled": True, "noise_multiplier": 1.0}}
    del tree["federation"]["weighting"]
    private = build_config(tree)
    assert private.institution_noise_at == "sites"
    honest = driver.plan_for

    def quieter(c: Config, d: int, n: int) -> Any:
        plan = honest(c, d, n)
        return dataclasses.replace(plan, variance=plan.variance // 4)

    monkeypatch.setattr(driver, "plan_for", quieter)
    trained: list[int] = []
    monkeypatch.setattr(
        "client.app.run_local_round", lambda *a, **k: trained.append(1) or pytest.fail("trained")
    )
    with (
        caplog.at_level(logging.ERROR, logger="client.secagg_site"),
        pytest.raises(RoundError, match=r"round 1: 0 site\(s\) succeeded"),
    ):
        run_attacked((private, nodes, root), "quiet", lambda grid, node, msg: None)
    assert not trained
    refusals = [r for r in caplog.records if "refusing the coordinator's noise plan" in r.message]
    assert len(refusals) == 4 and all("noise is below" in r.message for r in refusals)
