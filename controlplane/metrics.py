"""Operation metrics: logged always, published to CloudWatch when enabled.

Provision reports queued-to-ready latency, pool hit rate, launch failures by
EC2 error code and API calls; release reports returned vs terminated. With
``metrics_cloudwatch: true`` in the pool config they go to CloudWatch (one
PutMetricData per operation, dimension ``Pool``); failures to publish are
logged, never fatal.
"""
from __future__ import annotations

from typing import Any

from controlplane import aws
from controlplane.logs import event


def _put(namespace: str, region: str, pool: str, data: list[tuple[str, float, str]]) -> None:
    try:
        aws.client("cloudwatch", region).put_metric_data(Namespace=namespace, MetricData=[
            {"MetricName": name, "Value": float(value), "Unit": unit,
             "Dimensions": [{"Name": "Pool", "Value": pool}]} for name, value, unit in data])
    except Exception as exc:  # noqa: BLE001 - metrics must never fail an operation
        event("metrics.publish_failed", pool=pool, error=str(exc))


def publish_provision(res: Any, cfg: Any = None) -> None:
    event("metrics.provision", run_id=res.run_id, ok=res.ok, ready_latency_s=res.timings.get("total"),
          pool_hit_rate=res.pool_hit_rate, launch_failures=res.capacity_errors, api_calls=res.api_calls)
    if cfg is None or not cfg.metrics_cloudwatch:
        return
    data = [("ProvisionLatency", res.timings.get("total", 0), "Seconds"),
            ("PoolHitRate", res.pool_hit_rate, "None"),
            ("ProvisionFailed", 0 if res.ok else 1, "Count"),
            ("ApiCalls", sum(res.api_calls.values()), "Count")]
    data += [(f"LaunchFailures.{code}", n, "Count") for code, n in res.capacity_errors.items()]
    _put(cfg.metrics_namespace, cfg.region, cfg.name, data)


def publish_release(res: Any, cfg: Any = None) -> None:
    event("metrics.release", run_id=res.run_id, returned=len(res.returned_to_pool), terminated=len(res.terminated))
    if cfg is None or not cfg.metrics_cloudwatch:
        return
    _put(cfg.metrics_namespace, cfg.region, cfg.name,
         [("RunnersReturned", len(res.returned_to_pool), "Count"), ("RunnersTerminated", len(res.terminated), "Count")])
