"""Pool queues over the emulator's SQS: DLQ, batch receive, give back, poison messages."""
from __future__ import annotations

import json
import time
from typing import Any

import pytest

from controlplane import aws
from controlplane import pool as pool_q
from controlplane.config import parse_config
from controlplane.pool import PoolMessage
from tests.conftest import pool_config_dict


@pytest.fixture
def cfg(local: dict[str, Any]) -> Any:
    c = parse_config(pool_config_dict(local))
    yield c
    for cls, url in pool_q.pool_queues(c).items():
        pool_q.delete_queue(c.region, url)
        dlq = pool_q.dlq_url(c, cls)
        if dlq:
            pool_q.delete_queue(c.region, dlq)


def msg(i: int, usage: str = "on-demand") -> PoolMessage:
    return PoolMessage(f"i-{i:017x}", "small", "c5a.large", usage, time.time())


def test_each_class_gets_a_queue_with_a_dead_letter_queue_and_long_polling(cfg: Any) -> None:
    urls = pool_q.ensure_queues(cfg)
    assert set(urls) == {"small", "large"}
    assert pool_q.ensure_queues(cfg) == urls                      # idempotent
    sqs = aws.client("sqs", cfg.region)
    attrs = sqs.get_queue_attributes(QueueUrl=urls["small"], AttributeNames=["All"])["Attributes"]
    redrive = json.loads(attrs["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(cfg.dlq_name("small"))
    assert int(redrive["maxReceiveCount"]) == pool_q.MAX_RECEIVES
    assert attrs["ReceiveMessageWaitTimeSeconds"] == str(pool_q.LONG_POLL_S)
    assert set(pool_q.pool_queues(cfg)) == {"small", "large"}


def test_receive_takes_up_to_ten_at_once_and_give_back_makes_them_visible_again(cfg: Any) -> None:
    url = pool_q.ensure_queues(cfg)["small"]
    pool_q.send(cfg.region, url, [msg(i) for i in range(15)])
    first = pool_q.receive(cfg.region, url, 10, 1)
    assert len(first) == 10
    assert pool_q.depth(cfg.region, url) == {"visible": 5, "in_flight": 10}
    pool_q.give_back(cfg.region, url, first[:4])
    pool_q.delete(cfg.region, url, first[4:])
    assert pool_q.depth(cfg.region, url)["visible"] == 9
    rest = pool_q.drain(cfg.region, url)
    assert len(rest) == 9 and {m.instance_id for m in rest} >= {m.instance_id for m in first[:4]}


def test_an_unparseable_message_is_deleted_on_sight(cfg: Any) -> None:
    url = pool_q.ensure_queues(cfg)["small"]
    sqs = aws.client("sqs", cfg.region)
    sqs.send_message(QueueUrl=url, MessageBody="not json")
    pool_q.send(cfg.region, url, [msg(1)])
    got = pool_q.receive(cfg.region, url, 10, 1)
    assert [m.instance_id for m in got] == [msg(1).instance_id]
    pool_q.delete(cfg.region, url, got)
    assert pool_q.depth(cfg.region, url) == {"visible": 0, "in_flight": 0}


def test_an_empty_queue_long_polls_for_the_wait_then_returns_nothing(cfg: Any) -> None:
    url = pool_q.ensure_queues(cfg)["small"]
    t = time.monotonic()
    assert pool_q.receive(cfg.region, url, 10, 1) == []
    assert time.monotonic() - t >= 0.9
