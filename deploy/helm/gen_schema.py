#!/usr/bin/env python3
"""Writes deploy/helm/marquee/values.schema.json.

The schema is generated because the four components share most of their shape and JSON Schema's
`additionalProperties: false` does not see through `allOf`: each object is spelled out whole
here instead of by hand four times. Every object closes with `additionalProperties: false`, so
a misspelt key fails `helm install` instead of being silently ignored.

    python deploy/helm/gen_schema.py          # rewrite the schema
    python deploy/helm/gen_schema.py --check  # exit 1 if the committed schema is stale

Service config keys mirror docs/CONFIG.md; keys the chart sets itself (listen addresses, the
model repository path, the device, backend discovery, secret file paths) are not accepted here,
nor are the `[repository]` keys a service refuses (batching keys outside vision, `lanes` other
than 1 on language).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent / "marquee" / "values.schema.json"

BACKENDS = ("vision", "language", "recommendation")
COMPONENTS = ("gateway", *BACKENDS)


def obj(props: dict, required: list[str] | None = None, description: str | None = None) -> dict:
    o = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        o["required"] = required
    if description:
        o["description"] = description
    return o


def map_of(value: dict, description: str | None = None) -> dict:
    """An object whose keys are names and whose values all have one shape."""
    o = {"type": "object", "additionalProperties": value}
    if description:
        o["description"] = description
    return o


def integer(minimum: int | None = 0, maximum: int | None = None) -> dict:
    s: dict = {"type": "integer"}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def number(minimum: float | None = 0) -> dict:
    s: dict = {"type": "number"}
    if minimum is not None:
        s["minimum"] = minimum
    return s


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
STRING_MAP = map_of(STRING)
STRING_LIST = {"type": "array", "items": STRING}
# Kubernetes objects passed through verbatim (tolerations, affinity, env, peers): the API server
# validates their inside; here only their outer type is checked.
K8S_OBJECT = {"type": "object"}
K8S_LIST = {"type": "array", "items": {"type": "object"}}
QUANTITY = {"anyOf": [{"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"}, {"type": "number", "minimum": 0}]}
LABEL_SELECTOR = obj(
    {"matchLabels": STRING_MAP, "matchExpressions": K8S_LIST},
)

SERVER = obj(
    {
        "max_message_bytes": integer(1024),
        "max_concurrent_requests": integer(1),
        "max_concurrent_open_requests": integer(1),
        "body_read_timeout_ms": integer(1),
        "http2_keepalive_interval_ms": integer(0),
        "default_timeout_ms": integer(1),
        "max_timeout_ms": integer(1),
        "drain_delay_ms": integer(0),
        "shutdown_grace_ms": integer(0),
        "worker_threads": integer(0),
        "blocking_threads": integer(1),
    },
    description="`[server]` (docs/CONFIG.md); the chart sets `grpc_addr` and `admin_addr` from `ports`.",
)

def repository(service: str) -> dict:
    """`[repository]` of one model service (crates/core/src/config.rs): every service takes
    `models`, `poll_interval_ms` and the `[instance]` overrides, but refuses the keys it would
    ignore (`RepositorySettings::refuse_unused`), so the schema does too: batching keys only on
    vision, `lanes` other than 1 not on language (one engine thread per model)."""
    props: dict = {
        "models": STRING_LIST,
        "poll_interval_ms": integer(0),
    }
    if service == "vision":
        props["profile_batching"] = BOOL
        props["batching"] = BOOL
        props["batching_control"] = {
            **BOOL,
            "description": "POST /batching/{model}/{cap} on the admin port (not authenticated): for benchmarks, not production.",
        }
        props["lane_nice"] = {
            **integer(0, 19),
            "description": "Niceness of the model lanes (default 10), so network work never waits behind a forward.",
        }
    if service == "language":
        props["lanes"] = {**integer(1, 1), "description": "The language engine is one lane per model: 1 or absent."}
    else:
        props["lanes"] = integer(1)
    props["threads"] = integer(1)
    if service == "recommendation":
        # One catalogue per service (feedback and erasure name items of one catalogue).
        props["models"] = {**STRING_LIST, "maxItems": 1}
    what = {
        "vision": "every classifier and tensor model in the repository (or those in `models`)",
        "language": 'every `kind = "causal_lm"` model in the repository (or those in `models`)',
        "recommendation": 'the one `kind = "recommender"` model in the repository (or the one in `models`)',
    }[service]
    return obj(
        props,
        description=f"`[repository]`: {what}; `lanes`/`threads` override each model's `[instance]`. "
        "The chart sets `path` from `modelStorage` and `device` from `gpu`.",
    )


VISION = obj(
    {
        "max_image_bytes": integer(1),
        "max_pixels": integer(1),
        "max_batch_items": integer(1),
        "max_aspect_ratio": integer(1),
        "decode_workers": integer(1),
        "decode_queue": integer(1),
    },
    description="`[vision]` image limits and the decode pool (docs/CONFIG.md).",
)

TENANT = obj(
    {
        "rate_per_s": number(0),
        "burst": number(1),
        "max_in_flight": integer(0),
        "weight": integer(1),
        "max_queued": integer(0),
    }
)

ROUTE = obj(
    {
        "default_timeout_ms": integer(1),
        "max_timeout_ms": integer(1),
        "max_request_bytes": integer(1),
        "batching": BOOL,
        "max_batch": integer(1),
        "max_batch_delay_us": integer(0),
        "max_batches_in_flight": integer(1),
        "retry_budget_percent": number(0),
    }
)

BACKEND_TUNING = obj(
    {
        "resolve_interval_ms": integer(1),
        "health_interval_ms": integer(1),
        "max_in_flight_per_endpoint": integer(1),
        "models_refresh_ms": integer(1),
    },
    description="Tuning of the gateway's backend; endpoints come from the component's headless Service.",
)

SCOPES = ["vision:infer", "language:generate", "recommendation:read", "recommendation:write", "admin"]
API_KEY = obj(
    {
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "tenant": STRING,
        "scopes": {"type": "array", "items": {"enum": SCOPES}},
    },
    required=["sha256", "tenant", "scopes"],
)

GATEWAY_CONFIG = obj(
    {
        "server": SERVER,
        "tenants": map_of(TENANT, "Tenants by name (only configured tenants exist)."),
        "routes": obj({"vision": ROUTE, "inference": ROUTE, "language": ROUTE, "recommendation": ROUTE}),
        "backends": obj({b: BACKEND_TUNING for b in BACKENDS}),
        "auth": obj(
            {
                "api_keys": {
                    "type": "array",
                    "items": API_KEY,
                    "description": "Inline keys: hashes only. Prefer `secrets.apiKeys`.",
                },
                "jwt": obj(
                    {
                        "issuer": STRING,
                        "audience": STRING,
                        "leeway_s": integer(0),
                        "tenant_claim": STRING,
                    }
                ),
            }
        ),
    },
    description="The gateway's TOML config (docs/CONFIG.md#marquee-gateway).",
)


LANGUAGE = obj(
    {
        "max_batch_size": integer(1),
        "max_total_tokens": integer(1),
        "queue_capacity": integer(1),
        "decode_steps_per_prefill": integer(1),
        "max_prefill_tokens": integer(1),
        "oip_queue_capacity": integer(1),
        "oip_max_tokens_per_step": integer(1),
        "max_new_tokens": integer(1),
        "default_max_new_tokens": integer(1),
        "max_stop_sequences": integer(0),
        "max_stop_bytes": integer(1),
        "max_prompt_bytes": integer(1),
        "max_return_sequences": integer(1),
        "default_model": STRING,
    },
    description="`[language]`: the scheduler and request limits of each model's engine (the models come from `[repository]`).",
)

RECOMMENDATION = obj(
    {
        "training_tenant": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"},
        "retention_days": integer(0, 36500),
        "retention_purge_interval_ms": integer(1),
        "candidates": integer(1),
        "max_k": integer(1),
        "max_batch_requests": integer(1),
        "max_filter_values": integer(1),
        "default_diversity": number(0),
        "long_tail_floor": number(0),
        "index": {"enum": ["ivf", "exact"]},
        "ivf_lists": integer(0, 65536),
        # (0, 1]: JSON Schema's exclusiveMinimum, as the service's check.
        "ivf_probe_share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "ivf_min_scan": integer(0),
        "ivf_rescore": integer(1, 100000),
        "engine_batch": integer(1, 256),
        "rank_batch": integer(1),
        "queue_capacity": integer(1),
        "max_clock_skew_ms": integer(0),
        "explain_history": integer(0),
        "explain_features": integer(0),
        # `[recommendation.postgres]` tuning; `url_file` is the chart's (the mounted
        # `recommendation.postgres` Secret), so it is not accepted here.
        "postgres": obj(
            {
                # At least 1 each, as the service's own check (pgstore.rs) demands.
                "pool_size": integer(1),
                "timeout_ms": integer(1),
                "start_timeout_ms": integer(1),
                "max_history": integer(1),
            },
            description="`[recommendation.postgres]` with `recommendation.store: postgres`; the chart sets `url_file`.",
        ),
    },
    description="`[recommendation]`; the chart sets `store` from `recommendation.store`, `state_dir` from `state`, "
    "`postgres.url_file` and `postgres.ca_file` from `recommendation.postgres`, `user_id_key_file` from `secrets.userIdKey` and "
    "`tenant_token_file` from `secrets.tenantToken`.",
)


def backend_config(name: str) -> dict:
    # Each service's own sections (services/<name>/src/lib.rs): `[server]`, `[repository]` and
    # the service's own section; `[telemetry]` is the chart's (from `telemetry`).
    own = {"vision": VISION, "language": LANGUAGE, "recommendation": RECOMMENDATION}[name]
    props = {"server": SERVER, "repository": repository(name), name: own}
    return obj(props, description=f"The {name} service's TOML config (docs/CONFIG.md).")


STORES = ("file", "postgres")

# What each recommendation store demands of the rest of the component. Written as "another
# store, or else ..." (`anyOf`, the same as `if`/`then`) because the validator's message then
# names the store beside the offending key ("store: value must be 'postgres'" next to
# "replicaCount: maximum: got 2, want 1"), where an `if`/`then` failure names only the key.
STORE_RULES = [
    # The file store is one feedback log on one volume with one writer: a second replica would
    # either fail to mount the claim or write the same log, so no replicas > 1 and no HPA.
    {
        "anyOf": [
            {"properties": {"store": {"enum": [s for s in STORES if s != "file"]}}},
            {
                "properties": {
                    "replicaCount": {"maximum": 1},
                    "autoscaling": {"properties": {"enabled": {"const": False}}},
                }
            },
        ]
    },
    # The postgres store has nothing to connect to without the connection string's Secret.
    {
        "anyOf": [
            {"properties": {"store": {"enum": [s for s in STORES if s != "postgres"]}}},
            {
                "properties": {"postgres": {"properties": {"existingSecret": {"minLength": 1}}}},
                "required": ["postgres"],
            },
        ]
    },
]


def component(name: str) -> dict:
    props = {
        "enabled": BOOL,
        "replicaCount": integer(0),
        "image": obj({"repository": STRING, "tag": STRING}, required=["repository"]),
        "ports": obj({"grpc": integer(1, 65535), "admin": integer(1, 65535)}, required=["grpc", "admin"]),
        "resources": obj(
            {
                "requests": map_of(QUANTITY),
                "limits": map_of(QUANTITY),
            },
            required=["requests", "limits"],
        ),
        "probes": obj(
            {"startupSeconds": integer(1), "periodSeconds": integer(1, 300)},
            required=["startupSeconds", "periodSeconds"],
        ),
        "preStopSleepSeconds": integer(0, 300),
        "terminationGraceMarginSeconds": integer(0),
        "autoscaling": obj(
            {
                "enabled": BOOL,
                "minReplicas": integer(1),
                "maxReplicas": integer(1),
                "targetCPUUtilizationPercentage": integer(1, 100),
                "queueDepth": obj(
                    {"enabled": BOOL, "metricName": STRING, "averageValue": QUANTITY}
                ),
            }
        ),
        "pdb": obj(
            {
                "enabled": BOOL,
                "maxUnavailable": {"anyOf": [integer(0), {"type": "string", "pattern": "^[0-9]+%$"}]},
            }
        ),
        "podAnnotations": STRING_MAP,
        "podLabels": STRING_MAP,
        "nodeSelector": STRING_MAP,
        "tolerations": K8S_LIST,
        "affinity": K8S_OBJECT,
        "extraEnv": K8S_LIST,
    }
    if name == "gateway":
        props["service"] = obj(
            {"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]}, "annotations": STRING_MAP}
        )
        props["config"] = GATEWAY_CONFIG
    else:
        props["gpu"] = obj(
            {
                "enabled": BOOL,
                "count": integer(1),
                "resourceName": STRING,
                "device": {"type": "string", "pattern": "^(cuda|cuda:[0-9]+)$"},
                "runtimeClassName": STRING,
                "nodeSelector": STRING_MAP,
                "tolerations": K8S_LIST,
            }
        )
        props["modelStorage"] = obj(
            {
                "type": {"enum": ["image", "pvc"]},
                "mountPath": {"type": "string", "pattern": "^/"},
                "image": obj(
                    {
                        "repository": STRING,
                        "tag": STRING,
                        "path": {"type": "string", "pattern": "^/"},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    }
                ),
                "sizeLimit": QUANTITY,
                "pvc": obj(
                    {
                        "existingClaim": STRING,
                        "size": QUANTITY,
                        "storageClassName": STRING,
                        "accessModes": {
                            "type": "array",
                            "items": {"enum": ["ReadOnlyMany", "ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]},
                        },
                    }
                ),
            },
            required=["type", "mountPath"],
        )
        props["config"] = backend_config(name)
        if name == "recommendation":
            props["store"] = {
                "enum": list(STORES),
                "description": "`file`: the feedback log on a claim, one replica; `postgres`: stateless replicas that may autoscale.",
            }
            props["state"] = obj(
                {
                    "mountPath": {"type": "string", "pattern": "^/"},
                    "existingClaim": STRING,
                    "size": QUANTITY,
                    "storageClassName": STRING,
                    # Writable modes only: the one pod writes the log.
                    "accessModes": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
                    },
                },
                description="The file store's volume (feedback log): an existing claim, else one the chart creates.",
            )
            props["postgres"] = obj(
                {
                    "existingSecret": STRING,
                    "key": {"type": "string", "minLength": 1},
                    "ca": obj(
                        {"existingSecret": STRING, "key": STRING},
                        description="The PEM CA certificate of the database (TLS, verified): its Secret "
                        "(default: the connection string's) and key; empty key: plain TCP.",
                    ),
                },
                description="The Secret (and its key) holding the PostgreSQL connection string of the postgres store.",
            )
    o = obj(props, required=["enabled", "image", "ports", "resources", "probes"])
    if name == "recommendation":
        o["allOf"] = STORE_RULES
    return o


def schema() -> dict:
    monitor = obj({"enabled": BOOL, "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"}, "labels": STRING_MAP})
    props = {
        "nameOverride": STRING,
        "fullnameOverride": STRING,
        "image": obj(
            {
                "registry": STRING,
                "tag": STRING,
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            }
        ),
        "imagePullSecrets": {"type": "array", "items": obj({"name": STRING}, required=["name"])},
        "podSecurity": obj(
            {"runAsUser": integer(1), "runAsGroup": integer(1), "fsGroup": integer(1)},
            description="Ids only: non-root is enforced (`runAsUser` ≥ 1).",
        ),
        "telemetry": obj(
            {
                "otlpEndpoint": {"type": "string", "pattern": "^(|https?://.+)$"},
                "logFormat": {"enum": ["json", "text"]},
                "logFilter": STRING,
            }
        ),
        "mesh": obj({"linkerd": obj({"enabled": BOOL}), "istio": obj({"enabled": BOOL})}),
        "networkPolicy": obj(
            {
                "enabled": BOOL,
                "gatewayFrom": K8S_LIST,
                "prometheus": obj({"namespaceSelector": LABEL_SELECTOR, "podSelector": LABEL_SELECTOR}),
            }
        ),
        "monitoring": obj(
            {
                "serviceMonitor": monitor,
                "podMonitor": monitor,
                "prometheusRule": obj({"enabled": BOOL, "labels": STRING_MAP}),
                "dashboards": obj(
                    {
                        "enabled": BOOL,
                        "label": STRING,
                        "labelValue": STRING,
                        "folder": STRING,
                        "labels": STRING_MAP,
                    }
                ),
            }
        ),
        "secrets": obj(
            {
                "apiKeys": obj({"existingSecret": STRING, "key": STRING}),
                "jwt": obj(
                    {
                        "existingSecret": STRING,
                        "hs256Key": STRING,
                        "publicKeys": STRING_LIST,
                        "jwksKey": STRING,
                    }
                ),
                "userIdKey": obj({"existingSecret": STRING, "key": {"type": "string", "minLength": 1}}),
                "tenantToken": obj({"existingSecret": STRING, "key": {"type": "string", "minLength": 1}}),
            }
        ),
    }
    for c in COMPONENTS:
        props[c] = component(c)
    s = obj(props)
    s["$schema"] = "https://json-schema.org/draft-07/schema#"
    s["title"] = "Marquee Helm chart values"
    return s


def render() -> str:
    return json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python {Path(__file__).name}", file=sys.stderr)
            sys.exit(1)
    else:
        SCHEMA_PATH.write_text(text)
