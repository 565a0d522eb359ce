"""Check the deployment files against each other and against Kubernetes' schemas.

Usage: check_deploy.py <spillway binary>

- Every manifest in deploy/kubernetes/ validates (kubernetes-validate, strict).
- The ConfigMap's spillway.toml passes `spillway check-config` (with the variables the AKS
  workload identity webhook and the Deployment's secrets would provide).
- No manifest runs an anonymous data plane: a listener beyond loopback needs consumers or
  Entra ID clients (the binary refuses it too; this names the file).
- The pieces agree: selectors match the pod labels, the HPA and PDB target the Deployment,
  probes use /readyz and /healthz on the data-plane port, the pod uses workload identity
  through the annotated ServiceAccount, and the grace period covers preStop, the shutdown
  delay and the drain timeout.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"


def fail(message):
    print(f"check_deploy: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    spillway = sys.argv[1]
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    objects = {}
    for name in kustomization["resources"]:
        document = yaml.safe_load((MANIFESTS / name).read_text())
        try:
            kubernetes_validate.validate(document, "1.31", strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{name}: {e.message}")
        objects[document["kind"]] = document
    for kind in ["ServiceAccount", "ConfigMap", "Deployment", "Service",
                 "HorizontalPodAutoscaler", "PodDisruptionBudget"]:
        if kind not in objects:
            fail(f"no {kind} in the kustomization")

    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for kind in ["Service", "PodDisruptionBudget"]:
        selector = objects[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        if any(labels.get(k) != v for k, v in selector.items()):
            fail(f"the {kind}'s selector {selector} does not match the pods {labels}")
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
        fail(f"the HPA scales {target}, not the Deployment")
    if labels.get("azure.workload.identity/use") != "true":
        fail("the pods do not use Azure Workload Identity")
    account = objects["ServiceAccount"]
    if pod["spec"]["serviceAccountName"] != account["metadata"]["name"]:
        fail("the pods do not run as the ServiceAccount")
    if "azure.workload.identity/client-id" not in account["metadata"].get("annotations", {}):
        fail("the ServiceAccount names no workload identity client id")

    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in [("readinessProbe", "/readyz"), ("startupProbe", "/readyz"),
                        ("livenessProbe", "/healthz")]:
        get = container[probe]["httpGet"]
        if get["path"] != path or get["port"] != "http":
            fail(f"{probe} should GET {path} on the data-plane port")

    toml_text = objects["ConfigMap"]["data"]["spillway.toml"]
    config = tomllib.loads(toml_text)
    server = config.get("server", {})
    if int(server["listen"].rsplit(":", 1)[1]) != ports["http"]:
        fail("server.listen is not the container's http port")
    if int(server["admin_listen"].rsplit(":", 1)[1]) != ports["admin"]:
        fail("server.admin_listen is not the container's admin port")
    anonymous = not config.get("consumers") and not config.get("auth", {}).get("jwt")
    listen_host = server["listen"].rsplit(":", 1)[0].strip("[]")
    if anonymous and listen_host not in ("127.0.0.1", "::1", "localhost"):
        fail(f"the ConfigMap serves {server['listen']} with no [[consumers]] and no [auth.jwt]: "
             "an open proxy spending the backends' capacity")
    for consumer in config.get("consumers", []):
        variable = consumer.get("key_env")
        if variable and variable not in secret_env(container):
            fail(f"consumer {consumer['name']}: {variable} is not set from a Secret in the Deployment")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_s = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    needed = pre_stop_s + (server.get("shutdown_delay_ms", 5000) + server.get("drain_timeout_ms", 20000)) / 1000
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    if grace < needed:
        fail(f"terminationGracePeriodSeconds {grace} < preStop + shutdown delay + drain ({needed})")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        (scratch / "spillway.toml").write_text(toml_text)
        (scratch / "token").write_text("eyJ.service-account.token")
        env = dict(os.environ, **{name: f"secret-{name}" for name in secret_env(container)})
        env.update(AZURE_CLIENT_ID="00000000-0000-0000-0000-000000000000",
                   AZURE_TENANT_ID="00000000-0000-0000-0000-000000000001",
                   AZURE_FEDERATED_TOKEN_FILE=str(scratch / "token"),
                   SPILLWAY__STATE__REDIS_URL="rediss://:key@example.redis.cache.windows.net:6380")
        out = subprocess.run([spillway, "check-config", "--config", str(scratch / "spillway.toml")],
                             env=env, capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"the ConfigMap's spillway.toml: {out.stderr.strip()}")
    print(f"check_deploy: {len(objects)} Kubernetes manifests valid and consistent")


def secret_env(container):
    """The container's variables that come from a Secret."""
    return {e["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


if __name__ == "__main__":
    main()
