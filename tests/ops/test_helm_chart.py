"""The Helm chart: values schema, rendering with Helm's own engine, Kubernetes schemas, and wiring.

Rendering uses helm-python-sdk, which bundles Helm v4's Go SDK as a shared library, so these are
real `helm template` renders (Sprig, `fail`, `lookup` offline, schema validation), not an imitation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops._support import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    REPO,
    by_kind,
    default_values,
    helm,
    need_module,
    one,
    render,
    render_docs,
)

FULLNAME = "demo-fmgate"

# Value sets that together switch on every template and branch worth checking.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "scale-out": {
        "replicaCount": 3,
        "redis": {"url": "redis://:pw@redis.cache.svc:6379/0"},
        "adminKey": {"existingSecret": "fmgate-admin", "existingSecretKey": "key"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
        "fmgate": {
            "corsOrigins": ["https://app.example"],
            "extraEnv": [{"name": "FMGATE_LIMITS__MAX_N", "value": "4"}],
        },
        "config": {"limits": {"max_tokens_cap": 2048}},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "demo"}},
            }
        ],
    },
    "autoscale-queue": {
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 6,
            "targetCPUUtilizationPercentage": None,
            "queueDepth": {"enabled": True, "averageValue": "3"},
        },
        "redis": {"builtin": {"enabled": True, "persistence": {"enabled": True, "size": "2Gi"}}},
    },
    "autoscale-cpu-builtin-redis": {
        "autoscaling": {"enabled": True},
        "redis": {"builtin": {"enabled": True}},
        "podDisruptionBudget": {"maxUnavailable": "25%"},
    },
    "gpu": {
        "gpu": {"enabled": True, "runtimeClassName": "nvidia"},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "nvidia.com/gpu.product",
                                    "operator": "In",
                                    "values": ["NVIDIA-H100-80GB-HBM3"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "32Gi"}},
        "models": [
            {
                "name": "qwen",
                "source": "Qwen/Qwen2.5-0.5B-Instruct",
                "task": "chat",
                "variant": "torch-bf16-cuda",
                "max_num_seqs": 64,
            }
        ],
    },
    "one-box-persistent-cache": {
        "modelCache": {"type": "pvc", "pvc": {"size": "50Gi", "storageClass": "fast-ssd"}},
        "strategy": {"type": "Recreate"},
    },
    "shared-model-cache": {
        "replicaCount": 3,
        "redis": {"url": "redis://:pw@redis.cache.svc:6379/0"},
        "modelCache": {"type": "shared", "shared": {"size": "100Gi", "storageClass": "nfs-client"}},
    },
    "existing-secrets": {
        "redis": {"existingSecret": "redis-conn"},
        "modelCache": {"type": "existingClaim", "pvc": {"existingClaim": "fmgate-cache"}},
        "serviceAccount": {"create": False},
        "image": {"digest": "sha256:" + "a" * 64},
    },
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing for our purposes: maps merge, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render_docs(values) for name, values in SCENARIOS.items()}


# --- Chart.yaml -------------------------------------------------------------------------------------


def test_chart_metadata_matches_the_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "fmgate" == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", chart["version"])
    assert chart["appVersion"] == project["version"], "bump appVersion with the project's version"
    assert "dependencies" not in chart, "a declared dependency must be fetched before every install"


def test_helm_lint_is_clean():
    h = helm()
    for kube in KUBE_VERSIONS:
        report = h.lint(str(CHART), strict=True, kube_version=f"v{kube}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


# --- values.schema.json -----------------------------------------------------------------------------


def test_schema_is_valid_draft7_and_accepts_the_defaults(schema):
    jsonschema = need_module("jsonschema", "jsonschema")
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(default_values())
    with helm().Chart.load(str(CHART)) as chart:
        chart.validate_schema(None)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_schema_accepts_each_scenario(schema, name):
    jsonschema = need_module("jsonschema", "jsonschema")
    jsonschema.Draft7Validator(schema).validate(deep_merge(default_values(), SCENARIOS[name]))


BAD_VALUES = {
    "typo at the top": ({"replicaCuont": 2}, "replicaCuont"),
    "typo in a section": ({"fmgate": {"shutdownGrace": 10}}, "shutdownGrace"),
    "negative replicas": ({"replicaCount": -1}, "replicaCount"),
    "replicas as a string": ({"replicaCount": "3"}, "replicaCount"),
    "unknown auth mode": ({"fmgate": {"auth": "maybe"}}, "auth"),
    "model without a source": ({"models": [{"name": "m"}]}, "source"),
    "unknown model task": ({"models": [{"name": "m", "source": "x", "task": "generate"}]}, "task"),
    "unknown model field": ({"models": [{"name": "m", "source": "x", "max_seqs": 4}]}, "max_seqs"),
    "max_num_seqs below 1": ({"models": [{"name": "m", "source": "x", "max_num_seqs": 0}]}, "max_num_seqs"),
    "no models": ({"models": []}, "models"),
    "models inside config": ({"config": {"models": []}}, "config"),
    "redis url of another scheme": ({"redis": {"url": "http://redis:6379"}}, "url"),
    "grace period as a string": ({"terminationGracePeriodSeconds": "60"}, "terminationGracePeriodSeconds"),
    "hostPath cache": ({"modelCache": {"type": "hostPath"}}, "type"),
    "port out of range": ({"service": {"port": 70000}}, "port"),
    "zero GPUs": ({"gpu": {"count": 0}}, "count"),
    "bad quantity": ({"resources": {"requests": {"cpu": "two"}}}, "cpu"),
    "bad digest": ({"image": {"digest": "latest"}}, "digest"),
    "relative mount path": ({"modelCache": {"mountPath": "var/lib/fmgate"}}, "mountPath"),
    "unknown redis eviction policy": ({"redis": {"builtin": {"maxmemoryPolicy": "lru"}}}, "maxmemoryPolicy"),
    "redis maxmemory in Kubernetes units": ({"redis": {"builtin": {"maxmemory": "256Mi"}}}, "maxmemory"),
    "build job typo": ({"modelCache": {"shared": {"buildJob": {"enable": True}}}}, "enable"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_a_bad_value(schema, case):
    jsonschema = need_module("jsonschema", "jsonschema")
    override, where = BAD_VALUES[case]
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(deep_merge(default_values(), override)))
    assert errors, f"jsonschema accepted {override}"
    assert any(where in "/".join(map(str, e.absolute_path)) + " " + e.message for e in errors), errors
    # Helm itself refuses to render with it, naming the offending key.
    h = helm()
    with h.Chart.load(str(CHART)) as chart, pytest.raises(h.HelmValuesError, match=re.escape(where)):
        chart.render(override, name="demo")


def test_schema_models_mirror_settings_modelconfig(schema):
    settings = need_module("gateway.settings", "the project itself (pip install -e .)")
    item = schema["properties"]["models"]["items"]
    fields = settings.ModelConfig.model_fields
    assert set(item["properties"]) == set(fields), "values.schema.json models[] drifted from ModelConfig"
    required = {n for n, f in fields.items() if f.is_required()}
    assert set(item["required"]) == required
    assert set(item["properties"]["task"]["enum"]) == set(fields["task"].annotation.__args__)


def test_default_models_are_the_servers_defaults():
    settings = need_module("gateway.settings", "the project itself (pip install -e .)")
    chart_models = [settings.ModelConfig(**m) for m in default_values()["models"]]
    assert chart_models == settings.DEFAULT_MODELS


# --- rendering and Kubernetes validation -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_rendered_objects_are_valid_kubernetes(rendered, name, kube):
    kv = need_module("kubernetes_validate", "kubernetes-validate")
    docs = rendered[name]
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; checked in test_service_monitor_targets_the_service
        try:
            kv.validate(doc, kube, strict=True)
        except kv.ValidationError as exc:
            where = "/".join(map(str, exc.absolute_path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_objects_are_wired_together(rendered, name):
    docs = rendered[name]
    values = deep_merge(default_values(), SCENARIOS[name])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        assert d["metadata"]["name"].startswith(FULLNAME)
    gateway = one(docs, "Deployment", FULLNAME)
    pod = gateway["spec"]["template"]
    container = one([{"kind": "c", "metadata": c} for c in pod["spec"]["containers"]], "c")["metadata"]
    assert _selects(gateway["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])

    svc = one(docs, "Service", FULLNAME)
    assert _selects(svc["spec"]["selector"], pod["metadata"]["labels"])
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # Every Secret, ConfigMap and claim the pods use is rendered here, or named in values as existing.
    existing_secrets = {values["adminKey"]["existingSecret"], values["redis"]["existingSecret"]} - {""}
    secret_data = {d["metadata"]["name"]: d["data"] for d in by_kind(docs, "Secret")}
    for deploy in by_kind(docs, "Deployment") + by_kind(docs, "Job"):
        spec = deploy["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in existing_secrets:
                    assert ref["key"] in secret_data.get(ref["name"], {}), ref
            volume_names = {v["name"] for v in spec["volumes"]}
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volume_names
        for vol in spec["volumes"]:
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in names
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names or claim in (
                    values["modelCache"]["pvc"]["existingClaim"], values["modelCache"]["shared"]["existingClaim"])
    if values["serviceAccount"]["create"]:
        assert ("ServiceAccount", pod["spec"]["serviceAccountName"]) in names

    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", FULLNAME)
        assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert _selects(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    for job in by_kind(docs, "Job"):
        assert not _selects(svc["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"]), (
            "the gateway Service must not pick the build Job's pod"
        )
    if values["redis"]["builtin"]["enabled"]:
        redis = one(docs, "Deployment", f"{FULLNAME}-redis")
        redis_labels = redis["spec"]["template"]["metadata"]["labels"]
        assert _selects(one(docs, "Service", f"{FULLNAME}-redis")["spec"]["selector"], redis_labels)
        assert not _selects(svc["spec"]["selector"], redis_labels), (
            "the gateway Service must not pick Redis pods"
        )


def test_default_render_holds_the_expected_objects(rendered):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered["defaults"])
    assert kinds == [
        ("ConfigMap", FULLNAME),
        ("Deployment", FULLNAME),
        ("Secret", f"{FULLNAME}-admin"),
        ("Service", FULLNAME),
        ("ServiceAccount", FULLNAME),
    ]
    deploy = one(rendered["defaults"], "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["containers"][0]["image"] == "fmgate:0.1.0-cpu"
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert "emptyDir" in cache


def test_scale_out_render(rendered):
    docs = rendered["scale-out"]
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 3
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FMGATE_REDIS_URL"]["value"] == "redis://:pw@redis.cache.svc:6379/0"
    assert env["FMGATE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "fmgate-admin", "key": "key"}
    assert not by_kind(docs, "Secret"), "existingSecret: the chart must not make its own"
    assert not by_kind(docs, "PersistentVolumeClaim"), "replicas keep their caches in emptyDir"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    dash = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["fmgate.json"])["uid"] == "fmgate-overview"


def test_shared_model_cache_render(rendered):
    """Replicas share the model store's cache on one ReadWriteMany claim; FMGATE_HOME stays pod-local."""
    docs = rendered["shared-model-cache"]
    claim = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs-client"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 3
    pod = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["model-cache"]  # pod-local: the SQLite database, the HF download cache
    assert volumes["shared-models"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-models"
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert mounts["model-cache"] == env["FMGATE_HOME"]
    assert mounts["shared-models"] == env["FMGATE_HOME"] + "/models"  # where ModelStore(home) keeps its cache


def test_shared_model_cache_with_an_existing_claim():
    docs = render_docs({"replicaCount": 2, "redis": {"url": "redis://r:6379/0"},
                        "modelCache": {"type": "shared", "shared": {"existingClaim": "team-models"}}})
    assert not by_kind(docs, "PersistentVolumeClaim")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["team-models"]


def _pulls(containers: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(source, task, variant) of each `fmgate models pull` container, in order."""
    out = []
    for c in containers:
        args = c["args"]
        assert args[:2] == ["models", "pull"], args
        out.append((args[2], args[args.index("--task") + 1], args[args.index("--variant") + 1]))
    return out


def test_shared_cache_build_job_fills_the_cache_before_the_replicas_serve(rendered):
    """modelCache.type=shared: a Job pulls every model once into the shared claim, one after the other,
    with the gateway's image, resources and placement; each replica's init containers run the same
    pulls, which wait on the Job's file locks and return from the cache, so N replicas build once."""
    docs = rendered["shared-model-cache"]
    values = deep_merge(default_values(), SCENARIOS["shared-model-cache"])
    job = one(docs, "Job")
    assert re.fullmatch(f"{FULLNAME}-build-[0-9a-f]{{8}}", job["metadata"]["name"])
    jspec = job["spec"]["template"]["spec"]
    assert jspec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 2
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    models = [(m["source"], m.get("task", "chat"), m.get("variant", "auto")) for m in values["models"]]
    # Sequential: all but the last model as init containers (builds in parallel would skew the timings).
    assert _pulls(jspec.get("initContainers", []) + jspec["containers"]) == models
    assert len(jspec["containers"]) == 1
    gateway = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    serve = gateway["containers"][0]
    env = {e["name"]: e.get("value") for e in serve["env"]}
    for c in jspec.get("initContainers", []) + jspec["containers"]:
        assert c["image"] == serve["image"] and "command" not in c  # a failed build fails the Job, visibly
        assert c["resources"] == serve["resources"]  # the same thread count: its measurement is theirs
        cenv = {e["name"]: e.get("value") for e in c["env"]}
        assert cenv["FMGATE_HOME"] == env["FMGATE_HOME"] and cenv["HF_HOME"] == env["HF_HOME"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["shared-models"] == env["FMGATE_HOME"] + "/models"
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in jspec["volumes"]}
    assert claims["shared-models"] == f"{FULLNAME}-models" == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert "emptyDir" in next(v for v in jspec["volumes"] if v["name"] == "model-cache")
    # The replicas wait for it; a model that fails to build does not keep the pod (or the other models) down.
    inits = gateway["initContainers"]
    assert _pulls(inits) == models
    for c in inits:
        assert c["command"][:2] == ["/bin/sh", "-c"] and "|| echo" in c["command"][2]


def test_build_job_name_follows_what_it_builds():
    base = {"replicaCount": 2, "redis": {"url": "redis://r:6379/0"}, "modelCache": {"type": "shared"}}

    def name(extra):
        return one(render_docs(deep_merge(base, extra)), "Job")["metadata"]["name"]

    assert name({}) == name({"replicaCount": 5})  # unrelated changes keep the Job (and its finished run)
    assert name({}) != name({"models": [{"name": "q", "source": "Qwen/Qwen2.5-0.5B-Instruct"}]})
    assert name({}) != name({"image": {"tag": "0.2.0-cpu"}})


def test_build_job_options():
    base = {"replicaCount": 2, "redis": {"url": "redis://r:6379/0"}, "modelCache": {"type": "shared"}}
    docs = render_docs(deep_merge(base, {"modelCache": {"shared": {"buildJob": {
        "waitInInit": False, "ttlSecondsAfterFinished": None,
        "resources": {"requests": {"cpu": "8", "memory": "16Gi"}}}}}, "nodeSelector": {"pool": "cpu"}}))
    job = one(docs, "Job")
    assert "ttlSecondsAfterFinished" not in job["spec"]
    jspec = job["spec"]["template"]["spec"]
    assert jspec["containers"][0]["resources"] == {"requests": {"cpu": "8", "memory": "16Gi"}}
    assert jspec["nodeSelector"] == {"pool": "cpu"}
    assert "initContainers" not in one(docs, "Deployment")["spec"]["template"]["spec"]
    off = render_docs(deep_merge(base, {"modelCache": {"shared": {"buildJob": {"enabled": False}}}}))
    assert not by_kind(off, "Job") and "initContainers" not in one(off, "Deployment")["spec"]["template"]["spec"]
    for other in ({}, {"modelCache": {"type": "pvc"}}):  # only a shared cache has replicas to spare builds for
        assert not by_kind(render_docs(other), "Job")


def test_builtin_redis_memory_cap(rendered):
    """The chart's Redis stops at maxmemory (below its container limit) and, holding keys and quota
    counters, refuses writes there rather than evicting them."""
    args = one(rendered["autoscale-queue"], "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "192mb"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    docs = render_docs({"redis": {"builtin": {"enabled": True, "maxmemory": "1gb", "maxmemoryPolicy": "volatile-ttl",
                                              "resources": {"limits": {"memory": "1500Mi"}}}}})
    args = one(docs, "Deployment", f"{FULLNAME}-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == "1gb"
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-ttl"


def test_service_monitor_targets_the_service(rendered):
    docs = rendered["scale-out"]
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service", FULLNAME)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_queue_depth_autoscaling(rendered):
    docs = rendered["autoscale-queue"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "fmgate_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    cpu = one(rendered["autoscale-cpu-builtin-redis"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert cpu == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


def test_builtin_redis_is_wired_with_a_password(rendered):
    docs = rendered["autoscale-queue"]
    gateway = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]
    env = [e["name"] for e in gateway["env"]]
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert env.index("REDIS_PASSWORD") < env.index("FMGATE_REDIS_URL")
    url = next(e["value"] for e in gateway["env"] if e["name"] == "FMGATE_REDIS_URL")
    assert url == f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis:6379/0"
    redis = one(docs, "Deployment", f"{FULLNAME}-redis")
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"]["type"] == "Recreate"
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["redis-server", "--requirepass", "$(REDIS_PASSWORD)"]
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes"
    password = one(docs, "Secret", f"{FULLNAME}-redis")["data"]["redis-password"]
    assert len(password) >= 40  # base64 of 32 random characters
    assert one(docs, "PersistentVolumeClaim", f"{FULLNAME}-redis")


def test_gpu_render(rendered):
    deploy = one(rendered["gpu"], "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "fmgate:0.1.0-cuda"
    assert container["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": 1}
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeAffinity" in pod["affinity"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FMGATE_THREADS"] == "4"


def test_image_digest_wins_over_tag(rendered):
    image = one(rendered["existing-secrets"], "Deployment")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image == "fmgate@sha256:" + "a" * 64


# --- the server reads what the chart writes --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_server_settings_load_from_the_rendered_pod(rendered, name, tmp_path, monkeypatch):
    """The ConfigMap's config.yaml and the pod's FMGATE_* env produce the intended Settings."""
    settings = need_module("gateway.settings", "the project itself (pip install -e .)")
    docs = rendered[name]
    values = deep_merge(default_values(), SCENARIOS[name])
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    container = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]

    for var in list(os.environ):
        if var.startswith("FMGATE_"):
            monkeypatch.delenv(var)
    top_fields = settings.Settings.model_fields
    for env in container["env"]:
        if not env["name"].startswith("FMGATE_"):
            continue
        path = env["name"][len("FMGATE_") :].lower().split("__")
        assert path[0] in top_fields, f"{env['name']} is no fmgate setting"
        if "value" in env:
            value = env["value"].replace("$(REDIS_PASSWORD)", "pw")
        else:
            value = "from-a-secret" if "ADMIN" in env["name"] else "redis://from-a-secret:6379/0"
        monkeypatch.setenv(env["name"], value)
    monkeypatch.setenv("FMGATE_CONFIG", str(config))

    s = settings.Settings()
    assert s.models == [settings.ModelConfig(**m) for m in values["models"]]
    assert s.host == "0.0.0.0" and s.port == 8000
    assert str(s.home) == values["modelCache"]["mountPath"]
    assert s.shutdown_grace_s == values["fmgate"]["shutdownGraceSeconds"]
    assert s.admin_key
    assert (s.redis_url is not None) == bool(
        values["redis"]["url"] or values["redis"]["existingSecret"] or values["redis"]["builtin"]["enabled"]
    )
    for key, sub in values["config"].items():
        assert getattr(s, key).model_dump(include=set(sub)) == sub


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_pods_outlive_the_drain(rendered, name):
    """SIGTERM comes after preStop; the kubelet's SIGKILL must come after preStop + the drain."""
    pod = one(rendered[name], "Deployment", FULLNAME)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["FMGATE_SHUTDOWN_GRACE_S"])


@pytest.mark.parametrize(
    ("resources", "threads", "expected"),
    [
        ({"requests": {"cpu": "2"}}, 0, "2"),
        ({"requests": {"cpu": 4}}, 0, "4"),
        ({"requests": {"cpu": "500m"}}, 0, "1"),
        ({"requests": {"cpu": "1"}, "limits": {"cpu": "3500m"}}, 0, "3"),
        ({"limits": {"cpu": "2.5"}}, 0, "2"),
        (None, 0, "0"),
        ({"requests": {"cpu": "8"}}, 3, "3"),
    ],
)
def test_thread_count_follows_the_cpu_share(resources, threads, expected):
    docs = render_docs({"resources": resources, "fmgate": {"threads": threads}})
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["FMGATE_THREADS"] == expected


def test_generated_admin_key_and_explicit_one():
    import base64

    generated = one(render_docs(), "Secret")["data"]["admin-key"]
    assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(generated).decode())
    explicit = one(render_docs({"adminKey": {"value": "sk-admin-123"}}), "Secret")["data"]["admin-key"]
    assert base64.b64decode(explicit).decode() == "sk-admin-123"


def test_config_change_rolls_the_pods():
    def checksum(values):
        return one(render_docs(values), "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"limits": {"max_n": 2}}})


REFUSED = {
    "grace shorter than the drain": ({"terminationGracePeriodSeconds": 20}, "must exceed"),
    "two Redis sources": ({"redis": {"url": "redis://r:6379/0", "builtin": {"enabled": True}}}, "redis"),
    "url and existing secret": ({"redis": {"url": "redis://r:6379/0", "existingSecret": "s"}}, "redis"),
    "shared cache claim": (
        {"replicaCount": 2, "redis": {"url": "redis://r:6379/0"}, "modelCache": {"type": "pvc"}},
        "modelCache.type=emptyDir",
    ),
    "shared existing claim": (
        {
            "autoscaling": {"enabled": True},
            "redis": {"url": "redis://r:6379/0"},
            "modelCache": {"type": "existingClaim", "pvc": {"existingClaim": "c"}},
        },
        "modelCache.type=emptyDir",
    ),
    "replicas without Redis": ({"replicaCount": 2}, "needs Redis"),
    "existingClaim without a name": ({"modelCache": {"type": "existingClaim"}}, "existingClaim"),
    "min above max": (
        {
            "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3},
            "redis": {"url": "redis://r:6379/0"},
        },
        "minReplicas",
    ),
    "autoscaling on nothing": (
        {
            "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None},
            "redis": {"url": "redis://r:6379/0"},
        },
        "targetCPUUtilizationPercentage",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_inconsistent_values_refuse_to_render(case):
    h = helm()
    override, message = REFUSED[case]
    with pytest.raises(h.HelmRenderError, match=re.escape(message)):
        render(override)


def test_replicas_without_redis_are_allowed_only_with_auth_off():
    docs = render_docs({"replicaCount": 2, "fmgate": {"auth": "off"}})
    assert one(docs, "Deployment")["spec"]["replicas"] == 2


def test_one_box_persistent_cache(rendered):
    docs = rendered["one-box-persistent-cache"]
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The API server refuses rollingUpdate beside Recreate; the default's rollingUpdate must not leak in.
    assert one(docs, "Deployment", FULLNAME)["spec"]["strategy"] == {"type": "Recreate"}
    assert one(rendered["defaults"], "Deployment")["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_values_yaml_documents_every_top_level_key(schema):
    """values.yaml is the reference users read: every schema key has a default there."""
    missing = set(schema["properties"]) - {"global"} - set(default_values())
    assert not missing, missing


def test_chart_files_are_all_templates_or_known():
    known = {"Chart.yaml", "values.yaml", "values.schema.json", ".helmignore", "README.md"}
    for path in CHART.rglob("*"):
        if path.is_file():
            rel = path.relative_to(CHART)
            assert rel.parts[0] in {"templates", "dashboards"} or str(rel) in known, rel
    assert Path(CHART / "templates" / "NOTES.txt").is_file()
