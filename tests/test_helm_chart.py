"""The Helm chart (deploy/helm/pdserve), rendered and linted by Helm itself, offline.

`helm-python-sdk` embeds Helm v4 as a library: no binary, no cluster. Every variant is
rendered and linted; every RayCluster is validated against KubeRay's real CRD schema
(``deploy/schemas``, made strict so that a misspelt field fails instead of being pruned),
and every core object and every pod template with `kubernetes-validate` (strict). Then the
values are checked where they land.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve import __version__

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "pdserve"
SCHEMAS = REPO / "deploy" / "schemas"
KUBE_VERSION = "1.33.0"

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpus": {
        "prefill": {"replicas": 3, "gpusPerPod": 2},
        "decode": {"replicas": 2, "gpusPerPod": 1},
    },
    "tls_api_key": {
        "tls": {"enabled": True, "secretName": "pdserve-tls"},
        "apiKey": {"enabled": True, "secretName": "pdserve-key", "secretKey": "token"},
    },
    "pvc_model": {
        "model": {"source": "pvc", "path": "/models/llama", "pvc": {"claimName": "weights"}},
    },
    "host_path_model": {
        "model": {"source": "hostPath", "path": "/models/llama",
                  "hostPath": {"path": "/mnt/nvme/models"}},
    },
    "url_model": {
        "model": {"source": "url", "path": "/models/llama",
                  "url": {"uri": "s3://bucket/llama/",
                          "envFrom": [{"secretRef": {"name": "s3-creds"}}]}},
    },
    "service_monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    # deploy/README.md's snippets: SmolLM2 with a shared cache, a GGUF file from S3.
    "smollm2_shared_cache": {
        "model": {"source": "builtin", "path": "smollm2",
                  "cache": {"claimName": "pdserve-model-cache"}},
        "decode": {"replicas": 1, "workersPerPod": 2},
        "router": {"extraArgs": ["--served-model-name", "smollm2",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct"]}},
    "gguf_url": {
        "model": {"source": "url", "path": "/models/qwen2.5-7b-instruct-q4_k_m.gguf",
                  "url": {"uri": "s3://models/qwen2.5-7b-instruct/",
                          "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
                          "sizeLimit": "20Gi"}},
        "router": {"extraArgs": ["--served-model-name", "qwen2.5-7b-instruct"]}},
    "autoscaling": {
        "autoscaling": {"enabled": True},
        "prefill": {"replicas": 2, "minReplicas": 1, "maxReplicas": 8},
        "decode": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
    },
    "placement": {
        "prefill": {"nodeSelector": {"pool": "prefill-h100"},
                    "tolerations": [{"key": "prefill", "operator": "Exists",
                                     "effect": "NoSchedule"}]},
        "decode": {"nodeSelector": {"pool": "decode-a100"},
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}},
    },
    "grpc_probe_load_balancer": {"router": {"probe": "grpc"}, "service": {"type": "LoadBalancer"}},
    "router_options": {"router": {"extraArgs": ["--max-num-seqs", "256"],
                                  "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}]},
                       "ray": {"auth": {"mode": "disabled"}, "upgradeStrategy": "None"}},
    "routers": {"router": {"replicas": 3}, "model": {
        "source": "pvc", "path": "/models/llama", "pvc": {"claimName": "weights"}}},
}


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Render with release `demo` in namespace `serving`; objects grouped by kind."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, text in chart.render(values, name="demo", namespace="serving").items():
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def raycluster(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    (rc,) = render(chart, values)["RayCluster"]
    return rc


def groups(rc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """head, prefill and decode group specs."""
    spec = rc["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def router_args(rc: dict[str, Any]) -> list[str]:
    script = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]
    command = script[script.index("exec pdserve serve"):].replace("\\\n", " ")
    return command.split()[1:]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def validate_all(objects: dict[str, list[dict[str, Any]]],
                 validator: jsonschema.Draft7Validator) -> None:
    for kind, docs in objects.items():
        for doc in docs:
            if kind == "RayCluster":
                errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
                assert not errors, "\n".join(
                    f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
                for name, group in groups(doc).items():
                    pod = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": f"{name}-pod",
                                        **group["template"].get("metadata", {})},
                           "spec": group["template"]["spec"]}
                    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
            elif kind == "ServiceMonitor":  # a Prometheus Operator CRD: no schema here
                assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            else:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        out = _deep_merge(out, part)
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------- every variant


EXAMPLES = {f"examples/{p.name}": yaml.safe_load(p.read_text())
            for p in sorted((CHART / "examples").glob("*.yaml"))}
"""The example values files users start from (tests/test_helm_run.py runs them)."""


@pytest.mark.parametrize("variant", sorted(VARIANTS) + sorted(EXAMPLES))
def test_variant_renders_lints_and_validates(chart, raycluster_validator, variant: str) -> None:
    values = VARIANTS[variant] if variant in VARIANTS else EXAMPLES[variant]
    objects = render(chart, values)
    assert set(objects) >= {"RayCluster", "Service"}
    validate_all(objects, raycluster_validator)
    report = helm.lint(CHART, values, strict=True, namespace="serving",
                       kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


# ---------------------------------------------------------------------------- values land


def test_default_is_smollm2_on_cpu_with_one_worker_per_pool(chart) -> None:
    rc = raycluster(chart, {})
    g = groups(rc)
    args = router_args(rc)
    assert flag(args, "--device") == "cpu"
    assert flag(args, "--model") == '"smollm2"'
    assert (flag(args, "--prefill-workers"), flag(args, "--decode-workers")) == ("1", "1")
    assert flag(args, "--ray-address") == "auto"
    assert (flag(args, "--port"), flag(args, "--http-port")) == ("50051", "8000")
    assert "--prefill-resource" in args and flag(args, "--prefill-resource") == "pdserve_prefill=1"
    assert flag(args, "--decode-resource") == "pdserve_decode=1"
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    assert rc["spec"]["upgradeStrategy"] == {"type": "Recreate"}  # new pool sizes restart it
    assert "enableInTreeAutoscaling" not in rc["spec"]
    for role in ("prefill", "decode"):
        assert g[role]["replicas"] == g[role]["minReplicas"] == g[role]["maxReplicas"] == 1
        assert g[role]["rayStartParams"]["resources"] == f'"{{\\"pdserve_{role}\\": 1}}"'
        limits = g[role]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in limits


def test_every_pod_runs_restricted_with_writable_scratch_only(chart) -> None:
    for variant in ("default", "url_model", "tls_api_key"):
        for name, group in groups(raycluster(chart, VARIANTS[variant])).items():
            pod = group["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["runAsUser"] == 1000
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in pod["containers"] + pod.get("initContainers", []):
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert {"/tmp", "/home/ray", "/dev/shm"} <= mounts, name
    # Values merge into the defaults key by key; null removes one (Helm's rule).
    loose = raycluster(chart, {"securityContext": {"readOnlyRootFilesystem": False},
                               "podSecurityContext": None})
    head = groups(loose)["head"]["template"]["spec"]
    assert "securityContext" not in head
    sc = head["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is False and sc["allowPrivilegeEscalation"] is False


def test_builtin_models_are_cached_in_an_emptydir_or_a_shared_pvc(chart) -> None:
    for values, volume in (({}, {"emptyDir": {"sizeLimit": "2Gi"}}),
                           ({"model": {"cache": {"claimName": "model-cache"}}},
                            {"persistentVolumeClaim": {"claimName": "model-cache"}})):
        for name, group in groups(raycluster(chart, values)).items():
            pod = group["template"]["spec"]
            (cache,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
            assert {k: v for k, v in cache.items() if k != "name"} == volume, name
            assert {"name": "model-cache", "mountPath": "/home/ray/.cache/pdserve"} in \
                pod["containers"][0]["volumeMounts"]
    pvc = groups(raycluster(chart, VARIANTS["pvc_model"]))["head"]["template"]["spec"]
    assert "model-cache" not in {v["name"] for v in pvc["volumes"]}


def test_extra_env_and_the_gpu_resource_name_land_per_pool(chart) -> None:
    ucx = [{"name": "UCX_TLS", "value": "rc,cuda_copy,cuda_ipc"}]
    rc = raycluster(chart, merged(VARIANTS["gpus"], {
        "gpuResourceName": "amd.com/gpu", "prefill": {"extraEnv": ucx},
        "decode": {"extraEnv": [{"name": "UCX_NET_DEVICES", "value": "mlx5_0:1"}]}}))
    g = groups(rc)
    prefill = g["prefill"]["template"]["spec"]["containers"][0]
    decode = g["decode"]["template"]["spec"]["containers"][0]
    assert prefill["env"] == ucx
    assert decode["env"] == [{"name": "UCX_NET_DEVICES", "value": "mlx5_0:1"}]
    assert prefill["resources"]["limits"]["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in prefill["resources"]["limits"]
    assert "env" not in groups(raycluster(chart, {}))["prefill"]["template"]["spec"][
        "containers"][0]


def test_the_rendered_router_command_parses_with_pdserves_own_parser(chart) -> None:
    """The head's `pdserve serve ...` line, split as bash splits it, through the real CLI
    parser: an unknown flag (such as a `-v` the subcommand refused) fails here."""
    import shlex

    from pdserve.cli import build_parser

    parser = build_parser()
    for variant in sorted(VARIANTS):
        script = raycluster(chart, VARIANTS[variant])["spec"]["headGroupSpec"]["template"][
            "spec"]["containers"][0]["args"][0]
        line = script[script.index("exec pdserve serve"):].replace("\\\n", " ")
        args = parser.parse_args(shlex.split(line)[2:])
        assert args.command == "serve" and args.verbose is True, variant


def test_gpus_and_replicas_land_in_each_pool(chart) -> None:
    rc = raycluster(chart, VARIANTS["gpus"])
    g = groups(rc)
    args = router_args(rc)
    assert flag(args, "--device") == "cuda"
    assert (flag(args, "--prefill-workers"), flag(args, "--decode-workers")) == ("6", "2")
    assert g["prefill"]["replicas"] == 3 and g["decode"]["replicas"] == 2
    for role, gpus in (("prefill", 2), ("decode", 1)):
        container = g[role]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["cpu"] == "2"  # the defaults stay
        assert g[role]["rayStartParams"]["resources"] == f'"{{\\"pdserve_{role}\\": {gpus}}}"'
    head = g["head"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_tls_and_api_key_come_from_secrets(chart) -> None:
    rc = raycluster(chart, VARIANTS["tls_api_key"])
    pod = groups(rc)["head"]["template"]["spec"]
    head = pod["containers"][0]
    args = router_args(rc)
    assert flag(args, "--tls-cert") == "/etc/pdserve/tls/tls.crt"
    assert flag(args, "--tls-key") == "/etc/pdserve/tls/tls.key"
    assert {"name": "tls", "secret": {"secretName": "pdserve-tls"}} in pod["volumes"]
    assert {"name": "tls", "mountPath": "/etc/pdserve/tls", "readOnly": True} \
        in head["volumeMounts"]
    env = {e["name"]: e for e in head["env"]}
    assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-key",
                                                                  "key": "token"}
    assert "--api-key" not in args  # never on a command line
    # The HTTP port serves HTTPS too; the probes use the plain, keyless metrics port.
    assert head["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert flag(args, "--metrics-port") == "9090"


def test_router_options_land(chart) -> None:
    rc = raycluster(chart, VARIANTS["router_options"])
    assert router_args(rc)[-3:] == ["'--max-num-seqs'", "'256'", "-v"]
    head = groups(rc)["head"]["template"]["spec"]["containers"][0]
    assert head["env"] == [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    assert "authOptions" not in rc["spec"]
    assert rc["spec"]["upgradeStrategy"] == {"type": "None"}
    assert "env" not in groups(raycluster(chart, {}))["head"]["template"]["spec"]["containers"][0]


def test_probes_and_drain_on_the_router(chart) -> None:
    head = groups(raycluster(chart, {}))["head"]
    container = head["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):  # ready once both pools have a worker
        assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}
    # Alive while the router answers: a lost worker must not restart the head.
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["startupProbe"]["failureThreshold"] == 90
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop
    assert head["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051 and ports["http"] == 8000 and ports["metrics"] == 9090

    grpc = groups(raycluster(chart, VARIANTS["grpc_probe_load_balancer"]))["head"]
    assert grpc["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"] == {"port": 50051}


def test_service_exposes_grpc_and_http_on_the_head(chart) -> None:
    objects = render(chart, VARIANTS["grpc_probe_load_balancer"])
    (svc,) = objects["Service"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["selector"] == {"ray.io/cluster": "demo-pdserve",
                                       "app.kubernetes.io/component": "router"}
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        ("grpc", 50051, "grpc"), ("http", 8000, "http"), ("metrics", 9090, "metrics")}


def test_router_replicas_add_router_pods_behind_the_service(chart) -> None:
    """router.replicas N: the head's router plus a `router` group of N - 1 pods, selected by
    the Service, each a Ray node with nothing to schedule on it running `pdserve router`
    (a command pdserve's own parser accepts) with the head's ports, TLS and API key."""
    import shlex

    from pdserve.cli import build_parser

    assert "router" not in groups(raycluster(chart, {}))  # one router by default
    values = {"router": {"replicas": 3}, "tls": {"enabled": True, "secretName": "tls"},
              "apiKey": {"enabled": True, "secretName": "key"}}
    objects = render(chart, values)
    (rc,) = objects["RayCluster"]
    group = groups(rc)["router"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["rayStartParams"] == {"num-cpus": "0"}
    pod = group["template"]
    (svc,) = objects["Service"]

    def labels(name: str) -> dict[str, str]:  # KubeRay adds ray.io/cluster to every pod
        return {**groups(rc)[name]["template"]["metadata"]["labels"],
                "ray.io/cluster": "demo-pdserve"}

    selector = svc["spec"]["selector"].items()
    assert selector <= labels("router").items() and selector <= labels("head").items()
    for role in ("prefill", "decode"):  # the workers are not behind the Service
        assert not selector <= labels(role).items()
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    line = script[script.index("exec pdserve router"):].replace("\\\n", " ")
    line = line.replace('"$address"', "10.0.0.1:6379")
    args = build_parser().parse_args(shlex.split(line)[2:])
    assert args.command == "router" and args.ray_address == "10.0.0.1:6379"
    assert (args.port, args.http_port, args.metrics_port) == (50051, 8000, 9090)
    assert args.tls_cert == "/etc/pdserve/tls/tls.crt" and args.wait > 0
    assert {e["name"] for e in container["env"]} >= {"PDSERVE_API_KEY"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert {p["name"] for p in container["ports"]} == {"grpc", "http", "metrics"}


@pytest.mark.parametrize("variant", ["pvc_model", "host_path_model", "url_model"])
def test_model_source_reaches_every_pod(chart, variant: str) -> None:
    rc = raycluster(chart, VARIANTS[variant])
    assert flag(router_args(rc), "--model") == '"/models/llama"'
    for name, group in groups(rc).items():
        pod = group["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert [m["mountPath"] for m in mounts] == ["/models"], name
        if variant == "pvc_model":
            assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
        elif variant == "host_path_model":
            assert volume["hostPath"] == {"path": "/mnt/nvme/models", "type": "Directory"}
        else:
            assert "emptyDir" in volume
            (init,) = pod["initContainers"]
            env = {e["name"]: e.get("value") for e in init["env"]}
            assert env == {"MODEL_URL": "s3://bucket/llama/", "MODEL_DIR": "/models/llama",
                           "HOME": "/tmp"}  # the copy tool writes its own files there
            assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
            assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"},
                                            {"name": "tmp", "mountPath": "/tmp"}]


def test_node_selectors_tolerations_and_affinity_land_in_their_pool(chart) -> None:
    g = groups(raycluster(chart, VARIANTS["placement"]))
    prefill, decode = g["prefill"]["template"]["spec"], g["decode"]["template"]["spec"]
    assert prefill["nodeSelector"] == {"pool": "prefill-h100"}
    assert prefill["tolerations"][0]["key"] == "prefill"
    assert "affinity" not in prefill
    assert decode["nodeSelector"] == {"pool": "decode-a100"}
    assert "tolerations" not in decode
    assert decode["affinity"]["nodeAffinity"]
    assert "nodeSelector" not in g["head"]["template"]["spec"]


def test_autoscaling_sets_bounds_per_pool(chart) -> None:
    rc = raycluster(chart, VARIANTS["autoscaling"])
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["autoscalerOptions"] == {"upscalingMode": "Default",
                                               "idleTimeoutSeconds": 120}
    g = groups(rc)
    assert (g["prefill"]["minReplicas"], g["prefill"]["replicas"],
            g["prefill"]["maxReplicas"]) == (1, 2, 8)
    assert (g["decode"]["minReplicas"], g["decode"]["maxReplicas"]) == (1, 4)


def test_service_monitor_scrapes_metrics_on_the_metrics_port(chart) -> None:
    objects = render(chart, VARIANTS["service_monitor"])
    (sm,) = objects["ServiceMonitor"]
    (svc,) = objects["Service"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    selected = sm["spec"]["selector"]["matchLabels"]
    assert selected.items() <= svc["metadata"]["labels"].items()
    assert "ServiceMonitor" not in render(chart, {})


def test_notes_tell_how_to_reach_the_service(chart) -> None:
    notes = chart.render(VARIANTS["tls_api_key"], name="demo", namespace="serving")
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert "port-forward svc/demo-pdserve 50051:50051 8000:8000" in text
    assert "pdserve generate" in text and "--tls" in text and "PDSERVE_API_KEY" in text


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("values", "message"), [
    ({"prefill": {"replicas": -1}}, r"prefill.*replicas.*minimum"),
    ({"decode": {"gpusPerPod": -2}}, r"decode.*gpusPerPod.*minimum"),
    ({"model": {"source": "s3"}}, r"model.*source"),
    ({"tls": {"enabled": True}}, r"tls.*secretName"),
    ({"apiKey": {"enabled": True}}, r"apiKey.*secretName"),
    ({"model": {"source": "pvc", "path": "/models/x"}}, r"claimName"),
    ({"router": {"grpcPort": 70000}}, r"grpcPort.*maximum"),
    ({"prefill": {"replica": 2}}, r"replica"),  # a misspelt key
])
def test_schema_refuses_bad_values_with_a_clear_message(chart, values, message) -> None:
    with pytest.raises(helm.HelmValuesError, match=f"(?is){message}"):
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(helm.HelmError, match=f"(?is){message}"):
        chart.render(values, name="demo")


@pytest.mark.parametrize(("values", "message"), [
    ({"prefill": {"gpusPerPod": 1}}, "both 0 (CPU) or both > 0"),
    ({"tls": {"enabled": True, "secretName": "t"}, "router": {"probe": "grpc"}},
     "gRPC probes speak plaintext"),
    ({"model": {"source": "pvc", "path": "/data/x", "pvc": {"claimName": "w"}}},
     "must lie under model.mountPath"),
    ({"model": {"path": "/models/llama"}}, "model.source=builtin takes"),
    ({"autoscaling": {"enabled": True}, "prefill": {"replicas": 9, "maxReplicas": 4}},
     "prefill.replicas (9) must lie within"),
])
def test_inconsistent_values_fail_to_render_with_a_clear_message(chart, values, message) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name="demo")


# ---------------------------------------------------------------------------- the image


def test_default_image_is_what_the_dockerfile_publishes(chart) -> None:
    version = __version__
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)", dockerfile, re.M)
    ray = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M)
    assert cuda and ray
    assert chart.metadata["appVersion"] == version
    assert chart.values["image"]["tag"] == f"{version}-cu{cuda[1]}{cuda[2]}"
    assert chart.values["ray"]["version"] == ray[1]
    assert f"{chart.values['image']['repository']}:{version}-cu" in dockerfile


def test_the_image_runs_as_the_non_root_user_the_chart_expects(chart) -> None:
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    pod = chart.values["podSecurityContext"]
    assert (int(user[0]), int(user[1])) == (pod["runAsUser"], pod["runAsGroup"])
    assert pod["runAsNonRoot"] is True and int(user[0]) != 0
    assert re.search(r"useradd --uid 1000 --gid 100 .*--home-dir /home/ray", dockerfile)


def test_the_image_copies_every_folder_the_wheel_is_built_from() -> None:
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"].values()
    copied = set(re.findall(r"^COPY (\S+) /src/\1$", (REPO / "deploy" / "docker" /
                                                       "Dockerfile").read_text(), re.M))
    assert set(package_dirs) | {"clients"} <= copied
