"""The Helm chart, run: what it renders must start.

For the default values and every example values file (deploy/helm/pdserve/examples), the
chart is rendered (Helm itself, offline) and each container of the rendered RayCluster is run
as a local process with its own command, args and env, as KubeRay would run it:
``$KUBERAY_GEN_RAY_START_CMD`` is built the way KubeRay builds it (the group's
``rayStartParams``, its defaults, CPUs / memory / GPUs from the container's limits, flags
rendered ``--key=value``), the token-auth env KubeRay adds is set, and secrets are mounted
as files. The head's script starts Ray, waits for it and execs the router; each worker's
script execs its ``ray start``. The test passes when the router's readiness probe (as
rendered) answers 200 and a Generate comes back over the Service's gRPC port, with the TLS
and API key the values ask for; then SIGTERM drains the router, as the preStop hook does.

What one machine needs changed, and only that: the model is swapped for the built-in
``tiny`` and the device for the CPU, and the CPU kernels (which a CPU image would carry
built) come from this machine's kernel cache instead of being compiled in each pod (about
50 s on two cores); pools are shrunk to one pod and one worker each (values ``replicas`` /
``gpusPerPod`` / ``workersPerPod``); the router's ports are free ports (values); each Ray
node gets free ports and a small object store, and the head no dashboard (extra ``ray
start`` flags after KubeRay's); each pod's ``/tmp`` and ``$HOME`` are temp dirs; no idle
Ray workers are started ahead; worker nodes start one after the other, and a container that
exits is restarted a few times, as the kubelet would; UCX's transport and device selection
(``UCX_TLS``, ``UCX_NET_DEVICES``: InfiniBand, CUDA IPC) is left out. A chart whose
rendered command cannot start fails here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from pdserve.engine.cpu_kernels import KernelBuildError, build, cache_dir
from pdserve.engine.model.builtin import builtin_checkpoint, default_root
from pdserve.engine.ports import free_ports
from pdserve_client import Client
from tests.procs import Lines, stop_pids_using
from tests.test_helm_chart import CHART, merged, render

BIN = Path(sys.executable).parent
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CASES = {"default": {}, **{p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES}}
API_KEY = "chart-run-key"
HARDWARE_ENV = {"UCX_TLS", "UCX_NET_DEVICES"}
"""Transport tuning that names devices this machine lacks (InfiniBand ports, CUDA IPC)."""
LOCAL_RAY_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}
"""Three nodes on one machine: no idle Python workers started ahead (one per declared CPU,
a dozen processes importing Ray at once on two cores)."""

STARTUP_S = 300.0
"""How long a node or the router may take to come up. The chart's own startup probe allows
15 minutes; on a quiet 2-core machine each takes well under a minute, on this project's
shared one (load 20-50) up to a few."""

pytestmark = pytest.mark.timeout(900)


def test_there_are_examples_to_run() -> None:
    assert EXAMPLES and "values-gpu" in CASES


# ------------------------------------------------------------------------ KubeRay's part


def _quantity(value: Any) -> float:
    """A Kubernetes quantity ("16", "500m", "200Gi") as a number."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
             "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, text
    return float(match[1]) * units.get(match[2], 1.0)


def ray_start_command(group: dict[str, Any], head: bool, local: dict[str, str]) -> str:
    """The `ray start` KubeRay puts in $KUBERAY_GEN_RAY_START_CMD for this group, plus the
    ``local`` flags one machine needs (they win, as a later rayStartParams would)."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "cpu" in limits:
        params.setdefault("num-cpus", str(int(_quantity(limits["cpu"]))))
    if "memory" in limits:
        params.setdefault("memory", str(int(_quantity(limits["memory"]))))
    for key in sorted(limits):
        if key.endswith("gpu") and "num-gpus" not in params:
            params["num-gpus"] = str(int(_quantity(limits[key])))
    params.update(local)
    flags = []
    for option in sorted(params):
        value = params[option]
        if value.lower() in ("true", "false") and option not in ("include-dashboard",
                                                                 "log-color"):
            if value.lower() == "true":
                flags.append(f"--{option}")
        else:
            flags.append(f"--{option}={value}")
    return " ".join(["ray", "start", *(["--head"] if head else []), *flags])


# ------------------------------------------------------------------------ one run


@dataclass
class Pod:
    name: str
    container: dict[str, Any]
    tmp: Path
    home: Path
    proc: subprocess.Popen[str] | None = None
    logs: Lines | None = None
    files: dict[str, Path] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    history: list[str] = field(default_factory=list)

    def launch(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.logs = Lines(self.proc)

    def supervise(self, max_restarts: int = 6) -> None:
        """What the kubelet does (restartPolicy Always): a container that exited is started
        again, in a fresh container, a few times. On this shared 2-core machine Ray's 30 s
        node start-up deadline is sometimes missed."""
        assert self.proc is not None and self.logs is not None
        if self.proc.poll() is None:
            return
        self.history.append(self.logs.text(30))
        assert self.restarts < max_restarts, (
            f"{self.name} exited {self.restarts + 1} times; first:\n{self.history[0]}\n"
            f"last:\n{self.history[-1]}")
        self.restarts += 1
        self.clear()
        self.launch()

    def clear(self) -> None:
        """What a container restart leaves behind: nothing. Every process the last one
        started (the background ``ray start`` and Ray's daemons) is stopped, and /tmp and
        $HOME are empty again."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_pids_using(str(self.tmp.parent))
        for folder in (self.tmp, self.home):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()


def _local_values(values: dict[str, Any], grpc: int, http: int, metrics: int) -> dict[str, Any]:
    local: dict[str, Any] = {"router": {"grpcPort": grpc, "httpPort": http,
                                        "metricsPort": metrics}}
    for role in ("prefill", "decode"):
        gpus = int((values.get(role) or {}).get("gpusPerPod", 0))
        local[role] = {"replicas": 1, "gpusPerPod": min(gpus, 1), "workersPerPod": 1,
                       "minReplicas": 1}
    return merged(copy.deepcopy(values), local)


def _self_signed(folder: Path) -> None:
    """tls.crt / tls.key for 127.0.0.1, as a kubernetes.io/tls Secret holds them."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt"),
         "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)


def _env(pod: Pod, extra: dict[str, str]) -> dict[str, str]:
    """The container's env as the kubelet gives it (secretKeyRef resolved), plus KubeRay's."""
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "LANG": "C.UTF-8",
           "HOME": str(pod.home), "RAY_TMPDIR": str(pod.tmp),
           "PDSERVE_CACHE_DIR": str(default_root()), "PDSERVE_KERNEL_CACHE": str(cache_dir()),
           "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", **LOCAL_RAY_ENV}
    for var in pod.container.get("env", []):
        if var["name"] in HARDWARE_ENV:
            continue
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "pdserve-api-key", ref  # the only secret env we render
            env[var["name"]] = API_KEY
    env.update(extra)
    return env


def _script(pod: Pod) -> list[str]:
    """The container's command + args, with mount paths pointing at this pod's files."""
    cmd = list(pod.container["command"]) + list(pod.container.get("args", []))
    out = []
    for part in cmd:
        for mount, local in pod.files.items():
            part = part.replace(mount, str(local))
        out.append(part)
    return out


def _probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


class ChartRun:
    """Runs one rendered RayCluster's containers as local processes."""

    def __init__(self, chart: helm.Chart, values: dict[str, Any], root: Path) -> None:
        self.grpc, self.http, self.metrics = free_ports(3)
        self.values = _local_values(values, self.grpc, self.http, self.metrics)
        (self.rc,) = render(chart, self.values)["RayCluster"]
        self.root = root
        self.pods: list[Pod] = []
        self.token = secrets.token_hex(16)

    def _pod(self, name: str, group: dict[str, Any]) -> Pod:
        base = Path(tempfile.mkdtemp(prefix=f"pd{name[:2]}-", dir="/tmp"))  # short: Ray sockets
        (base / "t").mkdir()
        (base / "h").mkdir()
        pod = Pod(name, group["template"]["spec"]["containers"][0], base / "t", base / "h")
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "secret" in volume:
                local = base / mount["name"]
                local.mkdir()
                assert volume["secret"]["secretName"] == "pdserve-tls", volume
                _self_signed(local)
                pod.files[mount["mountPath"]] = local
        self.pods.append(pod)
        return pod

    def _kuberay_env(self, head: bool) -> dict[str, str]:
        env = {"RAY_ADDRESS": f"127.0.0.1:{self.gcs}"} if head else {}
        if self.rc["spec"].get("authOptions", {}).get("mode") == "token":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def _local_flags(self, head: bool) -> dict[str, str]:
        ports = free_ports(7)
        flags = {"metrics-export-port": str(ports[0]),
                 "dashboard-agent-listen-port": str(ports[1]),
                 "dashboard-agent-grpc-port": str(ports[2]),
                 "runtime-env-agent-port": str(ports[3]),
                 "object-store-memory": str(100 * 2**20), "disable-usage-stats": "true"}
        if head:
            flags.update({"port": str(self.gcs), "dashboard-port": str(ports[4]),
                          "ray-client-server-port": str(ports[5]),
                          "dashboard-host": "127.0.0.1", "include-dashboard": "false"})
        else:
            flags["address"] = f"127.0.0.1:{self.gcs}"
        return flags

    def start(self) -> None:
        spec = self.rc["spec"]
        (self.gcs,) = free_ports(1)
        head = self._pod("head", spec["headGroupSpec"])
        script = _script(head)
        script[-1] = re.sub(r'--model "[^"]*"', "--model tiny", script[-1])
        script[-1] = script[-1].replace("--device cuda", "--device cpu")
        head.argv = script
        head.env = _env(head, {
            **self._kuberay_env(True),
            "KUBERAY_GEN_RAY_START_CMD": ray_start_command(spec["headGroupSpec"], True,
                                                           self._local_flags(True))})
        head.launch()
        address_file = head.tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + STARTUP_S
        while not address_file.exists():
            head.supervise()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.5)
        for group in spec["workerGroupSpecs"]:  # one at a time: a 2-core GCS times out
            pod = self._pod(group["groupName"], group)
            pod.argv = _script(pod)
            pod.env = _env(pod, {**self._kuberay_env(False), "KUBERAY_GEN_RAY_START_CMD":
                                 ray_start_command(group, False, self._local_flags(False))})
            pod.launch()
            deadline = time.monotonic() + STARTUP_S
            while not (pod.logs and pod.logs.wait_for("Ray runtime started", timeout=1)):
                pod.supervise()
                assert time.monotonic() < deadline, self.logs()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.logs.text(40) if p.logs else ''}" for p in self.pods)

    def probe(self, kind: str) -> int:
        """The HTTP status the head's ``kind`` probe, as rendered, gets now (0: no answer)."""
        head = self.pods[0]
        probe = head.container[kind]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in head.container["ports"]}
        port = ports[probe["port"]] if isinstance(probe["port"], str) else probe["port"]
        return _probe(port, probe["path"])

    def wait_ready(self, timeout: float) -> None:
        """Until the head's readiness probe answers 200."""
        deadline = time.monotonic() + timeout
        while self.probe("readinessProbe") != 200:
            for pod in self.pods:
                pod.supervise()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(1)

    def client(self) -> Client:
        tls = bool(self.values.get("tls", {}).get("enabled"))
        ca = None
        if tls:
            ca = (self.pods[0].files["/etc/pdserve/tls"] / "tls.crt").read_bytes()
        key = API_KEY if self.values.get("apiKey", {}).get("enabled") else None
        return Client(f"127.0.0.1:{self.grpc}", api_key=key, tls=tls, root_certificates=ca,
                      timeout=60)

    def stop(self) -> None:
        """SIGTERM to the router (the head's preStop does `kill -TERM 1`), then the nodes."""
        head = self.pods[0]
        if head.proc is not None and head.proc.poll() is None:
            head.proc.send_signal(signal.SIGTERM)
            try:
                head.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGTERM)
                try:
                    pod.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(pod.proc.pid, signal.SIGKILL)
        for pod in self.pods:
            stop_pids_using(str(pod.tmp.parent))
            shutil.rmtree(pod.tmp.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    builtin_checkpoint("tiny")  # the swapped-in model, built once before any pod needs it
    try:
        build()  # and the CPU kernels (without a compiler, the pods take the torch path)
    except KernelBuildError:
        pass
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_the_chart_renders_starts_and_serves(chart, case: str, tmp_path: Path) -> None:
    if CASES[case].get("tls", {}).get("enabled") and shutil.which("openssl") is None:
        pytest.fail("the TLS example needs the openssl command for its test certificate")
    run = ChartRun(chart, CASES[case], tmp_path)
    try:
        run.start()
        run.wait_ready(timeout=STARTUP_S)
        with run.client() as client:
            completion = client.generate("The quick brown fox", max_tokens=4, temperature=0)
            assert len(completion.token_ids) == 4
            assert client.health()
        head = run.pods[0]
        assert run.probe("livenessProbe") == 200
        assert head.logs is not None
        assert head.logs.wait_for("pdserve.access: request", timeout=10), head.logs.text()
        placed = {line for line in head.logs.matching("pdserve.access")}
        assert any("prefill=prefill-0 decode=decode-0" in line for line in placed)
    finally:
        run.stop()
    assert run.pods[0].logs is not None
    assert run.pods[0].logs.wait_for("pdserve: stopped", timeout=5), run.logs()
    assert "unrecognized arguments" not in run.logs()


def test_kuberay_start_command_is_rendered_as_kuberay_renders_it() -> None:
    group = {"rayStartParams": {"resources": '"{\\"pdserve_prefill\\": 2}"', "num-cpus": "3"},
             "template": {"spec": {"containers": [{"resources": {"limits": {
                 "cpu": "16", "memory": "2Gi", "nvidia.com/gpu": 2}}}]}}}
    cmd = ray_start_command(group, False, {"address": "10.0.0.1:6379"})
    assert cmd == ('ray start --address=10.0.0.1:6379 --block '
                   '--dashboard-agent-listen-port=52365 --memory=2147483648 '
                   '--metrics-export-port=8080 --num-cpus=3 --num-gpus=2 '
                   '--resources="{\\"pdserve_prefill\\": 2}"')
    # As the worker container evaluates it: `eval "exec $KUBERAY_GEN_RAY_START_CMD"`.
    out = subprocess.run(["bash", "-c", 'eval "set -- $KUBERAY_GEN_RAY_START_CMD"; '
                          'printf "%s\\n" "$@"'], env={"KUBERAY_GEN_RAY_START_CMD": cmd},
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1].removeprefix("--resources=")) == {
        "pdserve_prefill": 2}
