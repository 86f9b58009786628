"""fedseg's SecAgg+ key agreement (X25519) and secret sharing replace Flower's on both sides."""

from __future__ import annotations

import importlib
import types

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from common import npy, shamir
from common import secagg_primitives as prim

CLIENT_MOD = importlib.import_module(prim.CLIENT_MOD)
WORKFLOW = importlib.import_module(prim.SERVER_WORKFLOW)
FLOWER_SHAMIR = importlib.import_module(prim.FLOWER_SHAMIR)


def test_client_and_server_modules_use_the_replacements():
    import client.app
    import server.app

    assert prim.is_installed(*client.app.PRIMITIVE_MODULES)
    assert prim.is_installed(*server.app.PRIMITIVE_MODULES)
    assert CLIENT_MOD.create_shares is shamir.create_shares
    assert WORKFLOW.combine_shares is shamir.combine_shares
    assert CLIENT_MOD.generate_shared_key is prim.generate_shared_key
    assert WORKFLOW.bytes_to_private_key is prim.bytes_to_private_key
    assert WORKFLOW.bytes_to_ndarray is npy.bytes_to_ndarray  # the masked vectors' reader
    assert client.app.secagg_suite() == server.app.secagg_suite() == prim.SUITE_ID


def test_flowers_own_key_module_is_left_alone():
    # The SuperNode's authentication signs with EC keys from this module: never patched.
    keys = importlib.import_module("flwr.supercore.primitives.asymmetric")
    private, _ = keys.generate_key_pairs()
    assert isinstance(private, ec.EllipticCurvePrivateKey)


def test_both_sides_agree_on_the_pairwise_key_through_raw_bytes():
    a_private, a_public = prim.generate_key_pairs()
    b_private, b_public = prim.generate_key_pairs()
    a_bytes, b_bytes = prim.public_key_to_bytes(a_public), prim.public_key_to_bytes(b_public)
    assert len(a_bytes) == len(b_bytes) == prim.KEY_BYTES
    ab = prim.generate_shared_key(prim.bytes_to_private_key(prim.private_key_to_bytes(a_private)),
                                  prim.bytes_to_public_key(b_bytes))
    ba = prim.generate_shared_key(b_private, prim.bytes_to_public_key(a_bytes))
    assert ab == ba
    assert len(ab) == 44  # url-safe base64 of 32 bytes: a Fernet key, as Flower derives
    c_private, _ = prim.generate_key_pairs()
    assert prim.generate_shared_key(c_private, prim.bytes_to_public_key(b_bytes)) != ab


def test_a_dropped_sites_key_rebuilt_from_shares_gives_the_same_masks_key():
    # What the server does in the unmask stage for a dropped site: combine its sk1 shares,
    # then re-derive each neighbour's pairwise key.
    site, _ = prim.generate_key_pairs()
    _, neighbour_public = prim.generate_key_pairs()
    shares = shamir.create_shares(prim.private_key_to_bytes(site), 3, 5)
    rebuilt = prim.bytes_to_private_key(shamir.combine_shares(shares[1:4]))
    assert prim.generate_shared_key(rebuilt, neighbour_public) == prim.generate_shared_key(
        site, neighbour_public)


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33,
                                 b"-----BEGIN PUBLIC KEY-----\n"])
def test_keys_of_the_wrong_form_are_refused(bad):
    with pytest.raises(ValueError, match="32 raw bytes"):
        prim.bytes_to_public_key(bad)
    with pytest.raises(ValueError, match="32 raw bytes"):
        prim.bytes_to_private_key(bad)


def test_a_small_order_peer_key_is_refused():
    private, _ = prim.generate_key_pairs()
    with pytest.raises(ValueError):
        prim.generate_shared_key(private, prim.bytes_to_public_key(bytes(32)))


def test_install_checks_the_flower_version_modules_and_call_sites():
    with pytest.raises(RuntimeError, match=r"flwr==1\.43\.0 is installed"):
        prim.install(CLIENT_MOD, flower_version="1.43.0")
    with pytest.raises(RuntimeError, match="is not a Flower module"):
        prim.install(types.ModuleType("flwr_from_the_future"))
    fake = types.ModuleType(prim.CLIENT_MOD)
    fake.__dict__.update({name: CLIENT_MOD.__dict__[name] for name in prim.PATCHED[
        prim.CLIENT_MOD]})
    exec("def _setup(k=generate_key_pairs):\n    return k()\n", fake.__dict__)
    with pytest.raises(RuntimeError, match="does not call generate_key_pairs through its module"):
        prim.install(fake)
    missing = types.ModuleType(prim.SERVER_WORKFLOW)
    with pytest.raises(RuntimeError, match="has no callable 'combine_shares'"):
        prim.install(missing)


def test_uninstall_restores_flowers_primitives_and_changes_the_suite():
    import client.app

    prim.uninstall(*client.app.PRIMITIVE_MODULES)
    try:
        assert CLIENT_MOD.create_shares is not shamir.create_shares
        assert CLIENT_MOD.generate_shared_key is not prim.generate_shared_key
        assert prim.active_id(*client.app.PRIMITIVE_MODULES) == prim.FLOWER_PRIMITIVES_ID
        assert client.app.secagg_suite() != prim.SUITE_ID
    finally:
        prim.install(*client.app.PRIMITIVE_MODULES)
    assert client.app.secagg_suite() == prim.SUITE_ID
    assert FLOWER_SHAMIR.create_shares is shamir.create_shares


def test_a_name_used_only_inside_a_comprehension_counts_as_looked_up_in_the_module():
    # Flower reads the masked vectors in a list comprehension (nested code of its own).
    from common.mask_prg import calls_by_global_name

    module = types.ModuleType("flwr_like")
    exec("def read(blobs):\n    return [load(b) for b in blobs]\n"
         "def bound(blobs, load=None):\n    return [load(b) for b in blobs]\n", module.__dict__)
    assert calls_by_global_name(module.read, module, "load")
    assert not calls_by_global_name(module.bound, module, "load")  # a parameter, not global
