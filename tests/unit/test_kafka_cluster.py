"""The local cluster's layout and the topics' replication: pure rules, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.kafka_admin import replication_for, topic_replication
from pipeline.localstack import broker_config, kafka_found_on_disk, kafka_layout
from pipeline.settings import Settings


def test_replication_keeps_up_to_three_copies_and_acks_on_all_but_one() -> None:
    assert [replication_for(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]


def test_one_broker_keeps_its_layout_and_the_cluster_defaults(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    (node,) = kafka_layout(settings)
    assert (node.node_id, node.port, node.controller_port, node.home) == (1, 9092, 9093, tmp_path / "kafka")
    config = broker_config(settings, node, [node])
    assert config["controller.quorum.bootstrap.servers"] == "127.0.0.1:9093"
    assert "controller.quorum.voters" not in config and "min.insync.replicas" not in config
    assert config["offsets.topic.replication.factor"] == "1"
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert topic_replication(settings) == (-1, None)  # exactly as before: the broker's defaults


def test_three_brokers_form_one_quorum_on_ports_two_apart(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, kafka_brokers=3, kafka_port=20000, kafka_controller_port=20001)
    layout = kafka_layout(settings)
    assert [(n.node_id, n.port, n.controller_port) for n in layout] == [
        (1, 20000, 20001),
        (2, 20002, 20003),
        (3, 20004, 20005),
    ]
    assert [n.home for n in layout] == [tmp_path / "kafka" / f"node-{i}" for i in (1, 2, 3)]
    assert settings.kafka_bootstrap == "127.0.0.1:20000,127.0.0.1:20002,127.0.0.1:20004"
    config = broker_config(settings, layout[1], layout)
    assert config["node.id"] == "2"
    assert config["controller.quorum.voters"] == "1@127.0.0.1:20001,2@127.0.0.1:20003,3@127.0.0.1:20005"
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:20002,CONTROLLER://127.0.0.1:20003"
    assert config["log.dirs"] == str(tmp_path / "kafka" / "node-2" / "data")
    for name in ("default.replication.factor", "offsets.topic.replication.factor",
                 "transaction.state.log.replication.factor"):  # fmt: skip
        assert config[name] == "3", name
    assert config["min.insync.replicas"] == config["transaction.state.log.min.isr"] == "2"
    assert config["unclean.leader.election.enable"] == "false"
    assert topic_replication(settings) == (3, 2)


def test_replication_settings_win_and_external_clusters_keep_their_defaults(tmp_path: Path) -> None:
    local = Settings(state_dir=tmp_path, kafka_brokers=3, topic_replication_factor=2)
    assert topic_replication(local) == (2, 1)
    assert topic_replication(local.model_copy(update={"topic_min_insync_replicas": 2})) == (2, 2)
    external = Settings(state_dir=tmp_path, bootstrap_servers="kafka-a:9092,kafka-b:9092")
    assert topic_replication(external) == (-1, None)
    assert topic_replication(external.model_copy(update={"topic_replication_factor": 3})) == (3, None)


def test_overlapping_cluster_ports_name_both_settings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"FEEDBACK_KAFKA_PORT 9092 and FEEDBACK_KAFKA_CONTROLLER_PORT 9094"):
        Settings(state_dir=tmp_path, kafka_brokers=3, kafka_controller_port=9094)
    with pytest.raises(ValidationError, match=r"FEEDBACK_TOPIC_MIN_INSYNC_REPLICAS 3 is above"):
        Settings(state_dir=tmp_path, topic_replication_factor=2, topic_min_insync_replicas=3)


def test_the_state_folder_says_how_many_brokers_it_holds(tmp_path: Path) -> None:
    assert kafka_found_on_disk(tmp_path) == 0
    (tmp_path / "kafka" / "data").mkdir(parents=True)
    (tmp_path / "kafka" / "data" / "meta.properties").write_text("node.id=1\n")
    assert kafka_found_on_disk(tmp_path) == 1
    for i in (1, 2, 3):
        (tmp_path / "kafka" / f"node-{i}").mkdir()
        (tmp_path / "kafka" / f"node-{i}" / "server.properties").write_text("")
    assert kafka_found_on_disk(tmp_path) == 3


def test_up_refuses_a_broker_count_other_than_the_one_the_state_holds(tmp_path: Path) -> None:
    from pipeline.errors import StackError
    from pipeline.localstack import LocalKafka

    (tmp_path / "kafka" / "data").mkdir(parents=True)
    (tmp_path / "kafka" / "data" / "meta.properties").write_text("node.id=1\n")
    kafka = LocalKafka(Settings(state_dir=tmp_path, kafka_brokers=3, kafka_port=20000, kafka_controller_port=20001))
    with pytest.raises(StackError, match=r"holds one broker, not the 3 asked for: run `feedback up --brokers 1`"):
        kafka._check_layout()


@pytest.mark.parametrize(("brokers", "faust_replicas"), [(1, 1), (3, 3)])
def test_the_topics_faust_creates_itself_get_the_pipelines_replication(
    tmp_path: Path, brokers: int, faust_replicas: int
) -> None:
    from stream_processors.app import create_app
    from stream_processors.outputs import CapturedOutputs

    settings = Settings(state_dir=tmp_path, table_store="memory", kafka_brokers=brokers, worker_metrics_port=0)
    fa = create_app(settings, outputs=CapturedOutputs())
    assert fa.app.conf.topic_replication_factor == faust_replicas  # its leader topic, outside ensure_topics
