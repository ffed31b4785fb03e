"""Data-parallel CalTrain: two real training enclaves (sim backend, in process) and an active host.

The host carries every byte between the enclaves (hellos, evidence, join tokens, gradient
ciphertexts), so these tests play it: it swaps in a peer with another measurement or plan,
replays an older step's encrypted gradient, swaps senders, tampers a ciphertext, hides instances
from one enclave. Each time an enclave must refuse with a clear error. No sockets: the messages
are passed by hand (the process version is tests/test_train_distributed.py).
"""

from __future__ import annotations

import pytest
import torch

from enclaveml.crypto import SigningKey, seal_owner_command
from enclaveml.errors import EvidenceRejected, PolicyViolation, ReplayedMessage, TamperedMessage
from enclaveml.tee.sim import SimBackend
from enclaveml.train.dp_enclave import DistributedEnclave, pack_records, shard_of, unpack_records
from enclaveml.train.enclave import START, enclave_config
from enclaveml.train.instances import make_upload
from enclaveml.train.partitioned import HostTrainer, TrainConfig, host_layers
from enclaveml.train.plan import TrainingPlan
from enclaveml.train.spec import ModelSpec
from image_helpers import random_png

SPEC = "darknet:width=4"
CFG = TrainConfig(epochs=1, batch=8, seed=3, augment=False)
OWNER = SigningKey.generate()


def _enclave(platform, owner=OWNER, plan=None) -> DistributedEnclave:
    be = SimBackend(enclave_config(owner.public_key()), platform_dir=platform, lock_memory=False)
    return DistributedEnclave(be, plan=plan)


@pytest.fixture()
def group(tmp_path_factory):
    torch.set_num_threads(1)
    platform = tmp_path_factory.getbasetemp() / "dp-platform"
    encs = [_enclave(platform), _enclave(platform)]
    people = [SigningKey.generate(), SigningKey.generate()]
    ups = [make_upload(encs[0].hpke.public_bytes(), people[i % 2], random_png(i), i % 10, plan=encs[0].plan_hash)[1]
           for i in range(24)]
    res = encs[0].ingest(ups)
    assert all(r["status"] == "accepted" for r in res), res
    items = [(r["tag"], r["sealed"]) for r in res]
    for e in encs:
        e.add_data(items)
    return encs, items, platform


def _handshake(encs):
    hellos = [e.dp_hello(r, len(encs)) for r, e in enumerate(encs)]
    evs = [e.dp_attest(hellos) for e in encs]
    for e in encs:
        e.dp_verify(evs)
    return hellos, evs


def _start(encs, run_id="dp-1", nonce=b"owner-nonce-dp-01", **extra):
    lead = encs[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, run_id, nonce,
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict(), **extra})
    info, back, joins = lead.dp_lead_start(cmd, None)
    infos = [info] + [e.dp_join(j)[0] for e, j in zip(encs[1:], joins)]
    return infos, back


def _hosts(encs, info, back_state):
    from safetensors.torch import load

    hosts = []
    for _ in encs:
        layers = host_layers(ModelSpec.parse(SPEC).build(), 3)
        layers.load_state_dict(load(back_state))
        hosts.append(HostTrainer(layers, CFG, info["total_steps"]))
    return hosts


def _step_tokens(encs, hosts, step):
    toks = []
    for e, h in zip(encs, hosts):
        ir = e.forward(step)
        g = e.loss_grad(h.forward(ir))
        toks.append(e.dp_backward(h.backward(g)))
    return toks


def test_shards_cover_every_instance_once_and_replicas_stay_identical(group):
    encs, items, _ = group
    _handshake(encs)
    infos, back = _start(encs)
    assert sum(i["shard"] for i in infos) == len(items) == infos[0]["n"]
    assert all(shard_of(t, 2) in (0, 1) for t, _ in items)
    assert {i["total_steps"] for i in infos} == {3}
    hosts = _hosts(encs, infos[0], back)
    for step in range(infos[0]["total_steps"]):
        toks = _step_tokens(encs, hosts, step)
        assert [e.dp_apply(toks) for e in encs] == [step + 1, step + 1]
    a, b = (list(e.trainer.module.state_dict().values()) for e in encs)
    assert len(a) > 4 and all(torch.equal(x, y) for x, y in zip(a, b))  # the mean in rank order: bit-identical
    # FrontNets, BatchNorm running statistics included (they are averaged like the gradients)


def test_a_peer_with_another_measurement_is_refused(group):
    encs, items, platform = group
    # the same owner and plan, but another enclave build/configuration: another measurement
    be = SimBackend({**enclave_config(OWNER.public_key()), "build": "patched"}, platform_dir=platform,
                    lock_memory=False)
    other = DistributedEnclave(be)
    assert other.plan_hash == encs[0].plan_hash and be.measurement() != encs[0].be.measurement()
    hellos = [encs[0].dp_hello(0, 2), other.dp_hello(1, 2)]
    evs = [encs[0].dp_attest(hellos), other.dp_attest(hellos)]
    with pytest.raises(PolicyViolation, match="peer enclave 1 is refused.*measurement"):
        encs[0].dp_verify(evs)
    with pytest.raises(Exception, match="not been verified"):
        encs[0].dp_lead_start(b"x", None)  # no key, no run for a group that did not verify


def test_a_peer_running_another_plan_is_refused(group):
    encs, items, platform = group
    plan = TrainingPlan.build(OWNER.public_key(), split=5)  # same code and owner, another plan
    other = _enclave(platform, plan=plan)
    hellos = [encs[0].dp_hello(0, 2), other.dp_hello(1, 2)]
    evs = [encs[0].dp_attest(hellos), other.dp_attest(hellos)]
    with pytest.raises(EvidenceRejected, match="peer enclave 1 is refused"):
        encs[0].dp_verify(evs)
    with pytest.raises(EvidenceRejected, match="peer enclave 0 is refused"):
        other.dp_verify(evs)


def test_evidence_from_an_earlier_session_is_refused(group):
    encs, _, _ = group
    _, old_evs = _handshake(encs)
    hellos = [e.dp_hello(r, 2) for r, e in enumerate(encs)]
    [e.dp_attest(hellos) for e in encs]
    with pytest.raises(EvidenceRejected, match="peer enclave 1"):
        encs[0].dp_verify(old_evs)  # the host replays last session's evidence of enclave 1


def test_host_cannot_replace_an_enclaves_own_hello(group):
    encs, _, _ = group
    hellos = [e.dp_hello(r, 2) for r, e in enumerate(encs)]
    with pytest.raises(TamperedMessage, match="own hello"):
        encs[0].dp_attest([bytes(64), hellos[1]])


def _running(encs):
    _handshake(encs)
    infos, back = _start(encs)
    return _hosts(encs, infos[0], back)


def test_replayed_gradient_of_an_older_step_is_refused(group):
    encs, _, _ = group
    hosts = _running(encs)
    old = _step_tokens(encs, hosts, 0)
    for e in encs:
        e.dp_apply(old)
    new = _step_tokens(encs, hosts, 1)
    with pytest.raises(TamperedMessage, match="enclave 1 for step 1 does not open"):
        encs[0].dp_apply([new[0], old[1]])  # step 0's gradient of enclave 1 again


def test_tampered_or_swapped_gradient_is_refused(group):
    encs, _, _ = group
    hosts = _running(encs)
    toks = _step_tokens(encs, hosts, 0)
    bad = bytearray(toks[1])
    bad[10] ^= 1
    with pytest.raises(TamperedMessage, match="does not open"):
        encs[0].dp_apply([toks[0], bytes(bad)])
    with pytest.raises(TamperedMessage, match="does not open"):
        encs[1].dp_apply([toks[1], toks[1]])  # enclave 1's own message passed off as enclave 0's
    with pytest.raises(TamperedMessage, match="expected gradients of 2"):
        encs[1].dp_apply([toks[0]])  # one dropped


def test_host_that_hides_instances_from_a_peer_is_refused(group):
    encs, items, _ = group
    encs[1].add_data(items[:-1], reset=True)  # the last instance kept from enclave 1 only
    _handshake(encs)
    lead = encs[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-2", b"owner-nonce-dp-02",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    _, _, joins = lead.dp_lead_start(cmd, None)
    with pytest.raises(TamperedMessage, match="another set of instances"):
        encs[1].dp_join(joins[0])


def test_join_token_for_another_peer_or_tampered_is_refused(group, tmp_path_factory):
    encs, items, platform = group
    third = _enclave(platform)
    third.add_data(items)
    encs3 = [*encs, third]
    _handshake(encs3)
    lead = encs3[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-3", b"owner-nonce-dp-03",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    _, _, joins = lead.dp_lead_start(cmd, None)
    with pytest.raises(TamperedMessage, match="join message"):
        encs3[1].dp_join(joins[1])  # enclave 2's token handed to enclave 1


def test_owner_asks_for_another_group_size(group):
    encs, _, _ = group
    _handshake(encs)
    with pytest.raises(PolicyViolation, match="asks for 3 enclaves"):
        _start(encs, enclaves=3)


def test_records_round_trip_and_peer_records_are_sealed(group):
    encs, _, _ = group
    backs = _trained(encs)
    tok = encs[1].dp_records(backs[0])  # rank 0's BackNet, as dp_host broadcasts it
    bad = bytearray(tok)
    bad[-1] ^= 1
    with pytest.raises(TamperedMessage, match="linkage records from enclave 1"):
        encs[0].dp_finish(backs[0], [bytes(bad)])
    out = encs[0].dp_finish(backs[0], [tok])
    assert out["records"] == encs[0].run["n"]
    recs = encs[0]._shard_records(backs[0])
    assert [r.instance_hash for r in unpack_records(pack_records(recs))] == [r.instance_hash for r in recs]


def test_no_message_is_sealed_twice_under_one_nonce(group):
    """A host that asks for a step's gradient twice (another dL/dIR), the records twice, or a second
    start in the same session must be refused: AES-GCM under a repeated nonce leaks the XOR of
    the plaintexts and the authentication key."""
    encs, _, _ = group
    hosts = _running(encs)
    e, h = encs[1], hosts[1]
    g = e.loss_grad(h.forward(e.forward(0)))
    d_ir = h.backward(g)
    e.dp_backward(d_ir)
    e.forward(0)  # the host replays the step
    with pytest.raises(ReplayedMessage, match="step 0"):
        e.dp_backward(d_ir * 2)
    lead = encs[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-9", b"owner-nonce-dp-09",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    with pytest.raises(ReplayedMessage, match="already started"):
        lead.dp_lead_start(cmd, None)  # a second (valid) owner command within one session


def test_records_are_sealed_once_per_session(group):
    encs, _, _ = group
    back = _trained(encs)[1]
    encs[1].dp_records(back)
    with pytest.raises(ReplayedMessage, match="records"):
        encs[1].dp_records(back)


def _trained(encs):
    """A two-enclave run stepped to its end; the hosts' BackNets (rank 0's is the one released)."""
    from safetensors.torch import save

    hosts = _running(encs)
    for step in range(encs[0].trainer.total_steps):
        toks = _step_tokens(encs, hosts, step)
        for e in encs:
            e.dp_apply(toks)
    return [save({k: v.contiguous() for k, v in h.module.state_dict().items()}) for h in hosts]


def test_single_enclave_ops_are_refused_in_a_group(group):
    """After a group start the host must not drive a replica with the single-enclave ops: a local
    `backward` is an SGD step on one shard, and `finish` would release that FrontNet as enclaves=2."""
    encs, _, _ = group
    hosts = _running(encs)
    lead = encs[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-s", b"owner-nonce-dp-0s",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    for e, h in zip(encs, hosts):
        before = [p.detach().clone() for p in e.trainer.module.parameters()]  # (forward moves BN statistics)
        g = e.loss_grad(h.forward(e.forward(0)))
        with pytest.raises(PolicyViolation, match="'backward' is a single-enclave op"):
            e.backward(h.backward(g))
        with pytest.raises(PolicyViolation, match="'finish'"):
            e.finish(b"")
        with pytest.raises(PolicyViolation, match="'start'"):
            e.start(cmd, None)
        assert e.trainer.step == 0 and e.run["run_id"] == "dp-1"
        assert all(torch.equal(a, b) for a, b in zip(before, e.trainer.module.parameters()))


def test_a_single_enclave_refuses_a_start_that_claims_a_group(group):
    encs, _, _ = group
    enc = encs[1]  # no group session: the single-enclave `start`
    cmd = seal_owner_command(OWNER, enc.hpke.public_bytes(), START, "solo", b"owner-nonce-solo1",
                             {"model": SPEC, "split": 3, "plan": enc.plan_hash.hex(), "config": CFG.to_dict(),
                              "enclaves": 2})
    with pytest.raises(PolicyViolation, match="asks for 2 enclaves; this is a single enclave"):
        enc.start(cmd, None)
    assert enc.run is None and enc.trainer is None


def test_peer_fingerprinting_with_another_backnet_is_refused(group):
    """The host hands enclave 1 another BackNet than the one enclave 0 releases: that shard's
    fingerprints would not match the released model, so enclave 0 refuses them."""
    encs, _, _ = group
    backs = _trained(encs)
    assert backs[0] != backs[1]  # these test hosts train independently (dp_host broadcasts rank 0's)
    tok = encs[1].dp_records(backs[1])
    with pytest.raises(TamperedMessage, match="enclave 1 fingerprinted its shard with another BackNet"):
        encs[0].dp_finish(backs[0], [tok])
    assert encs[0]._final is None and not getattr(encs[0], "_records", None)


def test_replayed_join_token_is_refused(group):
    """A host that recorded enclave 1's join token replays it mid-run: it would rewind that
    replica to step 0 (its FrontNet back to the initial weights) while enclave 0 goes on."""
    encs, _, _ = group
    _handshake(encs)
    lead = encs[0]
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-j", b"owner-nonce-dp-0j",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    info, back, joins = lead.dp_lead_start(cmd, None)
    encs[1].dp_join(joins[0])
    hosts = _hosts(encs, info, back)
    toks = _step_tokens(encs, hosts, 0)
    assert [e.dp_apply(toks) for e in encs] == [1, 1]
    with pytest.raises(ReplayedMessage, match="already joined"):
        encs[1].dp_join(joins[0])
    assert encs[1].trainer.step == 1


def test_refused_lead_start_changes_nothing(group):
    encs, _, _ = group
    _running(encs)
    lead = encs[0]
    run, trainer = lead.run, lead.trainer
    cmd = seal_owner_command(OWNER, lead.hpke.public_bytes(), START, "dp-1", b"owner-nonce-dp-01",
                             {"model": SPEC, "split": 3, "plan": lead.plan_hash.hex(), "config": CFG.to_dict()})
    _handshake(encs)  # a new session, but the owner's (used) nonce again
    with pytest.raises(ReplayedMessage, match="nonce"):
        lead.dp_lead_start(cmd, None)
    assert lead.run is None and lead.trainer is None and lead.owner is not None


def test_peer_verify_failure_of_an_odd_exception_type_is_evidence_rejected(group):
    import json

    encs, _, _ = group
    hellos = [e.dp_hello(r, 2) for r, e in enumerate(encs)]
    evs = [e.dp_attest(hellos) for e in encs]

    def broken(ev, expected):
        raise json.JSONDecodeError("bad evidence", "{", 0)  # its constructor takes three arguments

    encs[0]._peers._verify_fn = broken
    with pytest.raises(EvidenceRejected, match="peer enclave 1 is refused: bad evidence"):
        encs[0].dp_verify(evs)
    assert not encs[0]._peers.verified()


def test_fetch_release_checks_the_group_size(group, tmp_path):
    from enclaveml.train.owner import release

    encs, _, _ = group
    backs = _trained(encs)
    out = encs[0].dp_finish(backs[0], [encs[1].dp_records(backs[0])])

    class Host:  # carries the owner's command to the real enclave, as the host's /train/release does
        def release(self, run_id, cmd):
            return encs[0].release(cmd, out["final"])

    with pytest.raises(PolicyViolation, match="trained by 2 enclave"):
        release(Host(), encs[0].hpke.public_bytes(), b"release-nonce-001", OWNER, "dp-1", tmp_path / "m",
                enclaves=1)
    assert not (tmp_path / "m").exists()
