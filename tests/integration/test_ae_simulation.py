"""``model=ae_kmeans`` in real Flower simulations: SecAgg+ training, the model file, attacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import ConfigError, ProtocolError
from common.protocol import Phase
from common.segment_model import SegmentModel
from server.ae_coordinator import AEKMeansCoordinator
from simulations.run import build_sites, run

pytestmark = pytest.mark.integration

AE = ("model=ae_kmeans", "privacy=secagg", "data=mixed", "data.num_customers=3000",
      "model.k=5", "model.autoencoder.rounds=10", "model.autoencoder.hidden=[16]",
      # A short run of the default recipe moves little at its step sizes (ARI ~0.06 after 3
      # rounds); larger steps make 10 rounds learn the segments (ARI ~0.4 in-process).
      "model.autoencoder.lr=0.05", "model.autoencoder.server_lr=0.1",
      # One merge-and-split move of 2 rounds (after 2 settling rounds): the move's path through
      # Flower and SecAgg+ without the default's 320 extra rounds.
      "model.autoencoder.moves=1", "model.autoencoder.move_rounds=2",
      "strategy.n_init=2", "strategy.init_rounds=2", "seed=3", "centralized_reference=false")


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """One SecAgg+ run of the autoencoder on mixed-type data (shared by the checks below)."""
    from hydra import compose, initialize_config_dir

    from common.config import register_configs
    from tests.conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(AE))
    out = tmp_path_factory.mktemp("ae-secagg")
    summary = run(cfg, output_dir=out)
    return cfg, out, summary


def test_the_autoencoder_trains_through_secagg_and_sites_assign_with_its_encoder(secagg_run):
    cfg, out, summary = secagg_run
    assert summary["model"] == "ae_kmeans" and summary["secagg"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = 10 + 2 * 2  # rounds, then the settling and the move's rounds
    assert [m["phase"] for m in metrics[:trained + 2]] == \
        ["moments", *["ae_train"] * trained, "embed"]
    assert metrics[-1]["phase"] == "profile"
    for line in metrics[1:trained + 1]:  # every training round: each site's CPU time and upload
        assert line["cpu_seconds_per_site"] > 0 and line["bytes_uploaded_per_site"] > 0
        assert len(line["bytes_uploaded_by_site"]) == summary["num_sites"]
    losses = summary["ae_loss_per_round"]
    assert len(losses) == trained and losses[-1] < losses[0]
    # The move was tried through the secure sums and its outcome recorded in the model file.
    model_file = json.loads((out / "segments.json").read_text())
    moves = model_file["training"]["autoencoder"]["merge_split_moves"]
    assert len(moves) == 1 and isinstance(moves[0]["kept"], bool)
    assert moves[0]["loss"] > 0 and moves[0]["loss_before"] > 0
    # The published model carries the encoder; a site assigns its own records with it.
    model = SegmentModel.load(out / "segments.json")
    assert model.encoder is not None and len(model.segments) >= 2
    population, parts = build_sites(cfg)
    labels = model.assign(population.raw)
    assert summary["ari_vs_truth"] > 0.2  # far above chance (0); quality: the benchmark
    site0 = model.assign(population.raw[parts[0]])
    assert np.array_equal(site0, labels[parts[0]])
    # Sizes published from the secure profile sums equal the local assignments' counts.
    sizes = np.bincount(labels, minlength=len(model.segments))
    assert [s.size for s in model.segments] == sizes.tolist()


def test_the_plain_path_trains_the_same_model_as_secagg(secagg_run, make_cfg, tmp_path):
    cfg, out, summary = secagg_run
    plain = run(make_cfg(*AE, "privacy=none"), output_dir=tmp_path)
    secure = SegmentModel.load(out / "segments.json")
    clear = SegmentModel.load(tmp_path / "segments.json")
    assert secure.encoder is not None and clear.encoder is not None
    # SecAgg+ sums are exact to 2**-24 per site and entry: the same weights, the same segments.
    assert np.allclose(secure.encoder.weights, clear.encoder.weights, atol=1e-4)
    assert np.allclose(summary["ae_loss_per_round"], plain["ae_loss_per_round"], rtol=1e-5)
    population, _ = build_sites(cfg)
    assert np.array_equal(secure.assign(population.raw), clear.assign(population.raw))


class EncoderSwappingCoordinator(AEKMeansCoordinator):
    """Honest until the embedding is measured, then embeds with other weights.

    A server that could change the encoder between cluster rounds could pick weights that map
    one customer far from everyone and read its record from a centre's sums.
    """

    def instruction(self):  # type: ignore[no-untyped-def]
        name, arrays, groups = super().instruction()
        if self.phase in (Phase.INIT, Phase.LLOYD):
            arrays = [*arrays[:2], arrays[2] * 3.0, *arrays[3:]]
        return name, arrays, groups


def test_a_server_that_swaps_the_encoder_after_the_embedding_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*AE, "model.autoencoder.rounds=1")
    from server.plan import plan_from_config

    population, parts = build_sites(cfg)
    plan = plan_from_config(cfg, features=population.features, num_sites=len(parts))
    assert plan.ae is not None

    def factory() -> AEKMeansCoordinator:
        return EncoderSwappingCoordinator(settings=plan.settings, features=plan.features,
                                          ae=plan.ae)

    init_round = 1 + plan.ae.training_rounds + 1 + 1  # moments, training, embed, then init
    with pytest.raises(ProtocolError) as info:
        run(cfg, output_dir=tmp_path, coordinator_factory=factory)
    assert f"round {init_round} (init) produced no aggregate" in str(info.value)
    assert "fedseg-site-error protocol" in str(info.value)
    assert not (tmp_path / "segments.json").exists()
    logs = [p.read_text() for p in (tmp_path / "site-logs").glob("site-*.log")]
    assert logs and all("weights differ from those the embedding was measured with" in log
                        for log in logs)
    entries = [json.loads(line) for f in sorted((tmp_path / "audit").glob("site-*.jsonl"))
               for line in f.read_text().splitlines()]
    assert not any("masked_parameters" in json.dumps(e["configs"]) for e in entries
                   if e["round"] == str(init_round))


class AnchorPickingCoordinator(AEKMeansCoordinator):
    """Honest but for SCAFFOLD's anchor: asks each site for its gradient at a point it picks.

    The site's second gradient pass would then release ``sum(n_i * grad L_i(anchor))`` at
    weights the server chose freely -- one more probe of the customers every round.
    """

    def instruction(self):  # type: ignore[no-untyped-def]
        name, arrays, groups = super().instruction()
        if self.phase is Phase.AE_TRAIN and np.any(arrays[4]):
            arrays = [*arrays[:3], arrays[3] + 0.5, arrays[4]]
        return name, arrays, groups


def test_a_server_that_picks_the_scaffold_anchor_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*AE)
    from server.plan import plan_from_config

    population, parts = build_sites(cfg)
    plan = plan_from_config(cfg, features=population.features, num_sites=len(parts))
    assert plan.ae is not None and plan.ae.control_variates

    def factory() -> AEKMeansCoordinator:
        return AnchorPickingCoordinator(settings=plan.settings, features=plan.features,
                                        ae=plan.ae)

    with pytest.raises(ProtocolError) as info:
        run(cfg, output_dir=tmp_path, coordinator_factory=factory)
    # Round 2 (the first training round) has no control yet; round 3 carries the picked anchor.
    assert "round 3 (ae_train) produced no aggregate" in str(info.value)
    assert "fedseg-site-error protocol" in str(info.value)
    assert not (tmp_path / "segments.json").exists()
    logs = [p.read_text() for p in (tmp_path / "site-logs").glob("site-*.log")]
    assert logs and all("SCAFFOLD anchor is not the weights" in log for log in logs)
    entries = [json.loads(line) for f in sorted((tmp_path / "audit").glob("site-*.jsonl"))
               for line in f.read_text().splitlines()]
    assert not any("masked_parameters" in json.dumps(e["configs"]) for e in entries
                   if e["round"] == "3")


def test_the_autoencoder_is_refused_with_dp_before_anything_starts(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="not differentially private yet"):
        run(make_cfg(*AE, "privacy=secagg_dp"), output_dir=tmp_path)
    assert not (tmp_path / "sites").exists()


def test_a_site_labels_its_customers_with_the_encoder_through_fedseg_site(secagg_run, capsys):
    from client.gate import open_gate
    from client.site_cli import main as site_main

    _, out, _ = secagg_run
    contract = out / "sites" / "site-0" / "contract.yaml"
    capsys.readouterr()
    assert site_main(["--contract", str(contract), "assign", "--model",
                      str(out / "segments.json")]) == 0
    printed = capsys.readouterr().out
    model = SegmentModel.load(out / "segments.json")
    gate = open_gate(str(contract))
    stored = dict(gate.store.iter_assignments())
    data = gate.load()
    assert len(stored) == data.site.raw.shape[0] > 0
    expected = model.assign(data.site.raw)
    assert printed.startswith(f"assigned {len(expected)} consenting customer(s)")
    assert [stored[p]["segment_id"] for p in data.pseudonyms] == expected.tolist()
    # An altered encoder is refused by its checksum: one line, exit status 2, nothing stored.
    doc = json.loads((out / "segments.json").read_text())
    doc["encoder"]["centres"][0][0] += 1.0
    tampered = out / "tampered.json"
    tampered.write_text(json.dumps(doc))
    assert site_main(["--contract", str(contract), "assign", "--model", str(tampered)]) == 2
    assert "sha256" in capsys.readouterr().err
