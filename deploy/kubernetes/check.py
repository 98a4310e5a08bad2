"""What a schema cannot see in deploy/kubernetes: the manifests agree with each other
and with pgtide's configuration.

Run by validate.sh after the schema check, with the venv's Python (PyYAML):

    python check.py DIR [PGTIDE_BIN]

With PGTIDE_BIN, `pgtide check-config` also runs on the ConfigMap's pooler.toml (its
auth_file pointed at the example Secret's userlist.txt in a temporary directory).
Prints one line per check; exit status 1 when any fails.
"""

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def duration_s(text):
    """pgtide's durations as used here: "10s", "1m 30s", "500ms", "0"."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(ms|s|m|h)?", text):
        total += int(number) * units[unit or "s"]
    return total


def probes(container):
    return {
        kind: (p["httpGet"]["path"], p["httpGet"]["port"])
        for kind in ("readinessProbe", "livenessProbe", "startupProbe")
        if (p := container.get(kind))
    }


def port_number(container, port):
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container.get("ports", []) if p["name"] == port)


def hardened(pod, container, what):
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    check(sc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot")
    check(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation false")
    check(container.get("resources", {}).get("requests", {}).keys() >= {"cpu", "memory"},
          f"{what}: CPU and memory requests")


def main():
    root = Path(sys.argv[1])
    pgtide_bin = sys.argv[2] if len(sys.argv) > 2 else None

    # The shared pooler.
    shared = {d["kind"]: d for f in sorted((root / "shared").glob("*.yaml")) for d in load(f)}
    check(set(shared) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"},
          f"shared/: a ConfigMap, Deployment, Service and PodDisruptionBudget ({sorted(shared)})")
    dep = shared["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(),
          "shared: the Deployment's selector matches its pods")
    check(shared["Service"]["spec"]["selector"].items() <= labels.items(),
          "shared: the Service selects the pgtide pods")
    check(shared["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items(),
          "shared: the PodDisruptionBudget selects the pgtide pods")
    check(dep["spec"]["replicas"] >= 2, "shared: at least 2 replicas")
    pdb = shared["PodDisruptionBudget"]["spec"]
    check(pdb.get("maxUnavailable", 0) < dep["spec"]["replicas"] or 0 < pdb.get("minAvailable", 0),
          "shared: the PodDisruptionBudget keeps a replica up")

    (c,) = [c for c in pod["containers"] if c["name"] == "pgtide"]
    config_text = shared["ConfigMap"]["data"]["pooler.toml"]
    config = tomllib.loads(config_text)["pgtide"]
    args = c["args"]
    config_path = args[args.index("--config") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_dir, config_file = config_path.rsplit("/", 1)
    check(volumes.get(mounts.get(config_dir), {}).get("configMap", {}).get("name")
          == shared["ConfigMap"]["metadata"]["name"] and config_file in shared["ConfigMap"]["data"],
          f"shared: --config {config_path} is the ConfigMap's file")
    auth_dir = config["auth_file"].rsplit("/", 1)[0]
    check("secret" in volumes.get(mounts.get(auth_dir), {}),
          f"shared: auth_file {config['auth_file']} is in a mounted Secret")

    metrics_port = int(config["metrics_listen"].rsplit(":", 1)[1])
    check(config["metrics_listen"].startswith("0.0.0.0:"), "shared: metrics_listen on 0.0.0.0 (kubelet probes)")
    check(config["listen"].startswith("0.0.0.0:"), "shared: listen on 0.0.0.0 (the Service)")
    p = probes(c)
    check(p.get("readinessProbe", ("",))[0] == "/readyz", "shared: readinessProbe on /readyz")
    check(p.get("livenessProbe", ("",))[0] == "/healthz", "shared: livenessProbe on /healthz")
    check(all(port_number(c, port) == metrics_port for _, port in p.values()),
          f"shared: the probes go to metrics_listen's port {metrics_port}")
    listen_port = int(config["listen"].rsplit(":", 1)[1])
    svc_ports = {port_number(c, sp["targetPort"]) for sp in shared["Service"]["spec"]["ports"]}
    check(svc_ports == {listen_port, metrics_port}, "shared: the Service's ports are listen's and metrics_listen's")

    delay = duration_s(config.get("shutdown_delay", "0"))
    timeout = duration_s(config.get("shutdown_timeout", "30s"))
    grace = pod["terminationGracePeriodSeconds"]
    check(grace > delay + timeout,
          f"shared: terminationGracePeriodSeconds {grace} > shutdown_delay {delay:g} + shutdown_timeout {timeout:g}")
    live = c["livenessProbe"]
    check(live["periodSeconds"] * live["failureThreshold"] > grace,
          "shared: a drain cannot fail the liveness probe for long enough to be restarted")
    hardened(pod, c, "shared pgtide")

    # The sidecar.
    (app_dep,) = [d for f in sorted((root / "sidecar").glob("*.yaml")) for d in load(f)]
    pod = app_dep["spec"]["template"]["spec"]
    (side,) = [c for c in pod.get("initContainers", []) if c["name"] == "pgtide"]
    check(side.get("restartPolicy") == "Always", "sidecar: pgtide is a native sidecar (restartPolicy Always)")
    args = side["args"]
    listen = args[args.index("--listen") + 1]
    metrics = args[args.index("--metrics-listen") + 1]
    check(listen.startswith("127.0.0.1:"), "sidecar: pgtide listens on the pod's loopback only")
    check(metrics.startswith("0.0.0.0:"), "sidecar: metrics on 0.0.0.0 (kubelet probes)")
    p = probes(side)
    check(p.get("readinessProbe", ("",))[0] == "/readyz" and p.get("livenessProbe", ("",))[0] == "/healthz",
          "sidecar: readiness /readyz, liveness /healthz")
    check(all(port_number(side, port) == int(metrics.rsplit(":", 1)[1]) for _, port in p.values()),
          "sidecar: the probes go to --metrics-listen's port")
    env = {e["name"]: e for e in side["env"]}
    check("DATABASE_URL" in env, "sidecar: pgtide's upstream from DATABASE_URL")
    for container in pod["containers"]:
        names = [e["name"] for e in container.get("env", [])]
        if "DATABASE_URL" not in names:
            continue
        url = next(e["value"] for e in container["env"] if e["name"] == "DATABASE_URL")
        check(f"@{listen}/" in url, f"sidecar: {container['name']}'s DATABASE_URL points at pgtide ({listen})")
        for ref in re.findall(r"\$\((\w+)\)", url):
            check(ref in names[: names.index("DATABASE_URL")],
                  f"sidecar: {container['name']}'s $({ref}) is defined before DATABASE_URL")
    hardened(pod, side, "sidecar pgtide")

    if pgtide_bin:
        secret = load(root / "secret.example.yaml")[0]
        with tempfile.TemporaryDirectory() as tmp:
            userlist = Path(tmp) / "userlist.txt"
            userlist.write_text(secret["stringData"]["userlist.txt"])
            text = config_text.replace(f'"{tomllib.loads(config_text)["pgtide"]["auth_file"]}"', f'"{userlist}"')
            (Path(tmp) / "pooler.toml").write_text(text)
            run = subprocess.run([pgtide_bin, "check-config", str(Path(tmp) / "pooler.toml")],
                                 capture_output=True, text=True)
            print(run.stdout + run.stderr, end="")
            check(run.returncode == 0, "shared: pgtide check-config accepts the ConfigMap's pooler.toml")

    print(f"{len(failures)} failed" if failures else "all consistency checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
