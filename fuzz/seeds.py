#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into corpus/<target>/.

The seeds are the project's real inputs: the pod templates, the policy and
the HA configuration under manifests/, the AdmissionReview and policy
fixtures of webhook/tests and core's unit tests, and one example of every
peer message, state record and command request. libFuzzer grows the corpus
from them; `cargo fuzz cmin` keeps what adds coverage (README.md,
"Coverage-guided fuzzing"). Run from the repository root:

    python3 fuzz/seeds.py

Needs PyYAML (Debian: python3-yaml) to read the manifests.
"""

import copy
import hashlib
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def manifests(path):
    with open(os.path.join(ROOT, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def compact(v):
    return json.dumps(v, separators=(",", ":"))


# Pods: the templates of the sample workloads and the controller and
# webhook Deployments, as the pods their controllers create.
pods = []
for path in [
    "manifests/sample/web.yaml",
    "manifests/sample/database.yaml",
    "manifests/sample/files.yaml",
    "manifests/base/controller/deployment.yaml",
    "manifests/base/webhook/deployment.yaml",
]:
    for doc in manifests(path):
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        template = copy.deepcopy(doc["spec"]["template"])
        meta = template.get("metadata", {})
        meta["generateName"] = doc["metadata"]["name"] + "-7d9c-"
        meta["namespace"] = "shop"
        spec = template["spec"]
        # A StatefulSet's pods get a volume per claim template.
        for claim in doc["spec"].get("volumeClaimTemplates", []):
            name = claim["metadata"]["name"]
            spec.setdefault("volumes", []).append(
                {"name": name, "persistentVolumeClaim": {"claimName": name + "-0"}}
            )
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})

# The pod of webhook/tests/common::pod_review, and variants that reach each
# rule of the injector.
base = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"generateName": "web-7d9c-", "namespace": "shop",
                 "labels": {"app": "web", "pod-template-hash": "7d9c"}},
    "spec": {"containers": [{"name": "app", "image": "registry.invalid/web:1",
                             "ports": [{"containerPort": 8080}]}]},
}
pods.append(base)


def variant(f):
    p = copy.deepcopy(base)
    f(p)
    pods.append(p)


variant(lambda p: p["spec"].update(initContainers=[{"name": "migrate", "image": "x"}]))
variant(lambda p: p["spec"].update(readinessGates=[{"conditionType": "counterweight.dev/serving"}]))
variant(lambda p: p["spec"].update(readinessGates=[{"conditionType": "example.com/ready"}]))
variant(lambda p: p["spec"].update(automountServiceAccountToken=False))
variant(lambda p: p["spec"].update(hostNetwork=True))
variant(lambda p: p["spec"].update(volumes=[{"name": "counterweight-gate-run", "emptyDir": {}}]))
variant(lambda p: p["spec"].update(
    automountServiceAccountToken=False,
    volumes=[{"name": "counterweight-gate-run", "emptyDir": {}}]))
variant(lambda p: p["spec"].update(volumes=[{"name": "counterweight-gate-token", "emptyDir": {}}]))
variant(lambda p: p["spec"]["containers"].append({"name": "counterweight-lease", "image": "x"}))
variant(lambda p: p["spec"]["containers"].append({"name": "counterweight-gate", "image": "x"}))
variant(lambda p: p["metadata"].update(annotations={"counterweight.dev/inject": "disabled"}))
variant(lambda p: p["metadata"].update(annotations={"counterweight.dev/status": "injected-v1"}))
variant(lambda p: p["metadata"].update(annotations={"kubernetes.io/config.mirror": "x"}))
variant(lambda p: p["metadata"]["labels"].update({"counterweight.dev/role": "service"}))
variant(lambda p: p["metadata"]["labels"].update({"counterweight.dev/role": "database"}))
variant(lambda p: p["metadata"]["labels"].update({"counterweight.dev/role": "Service"}))
# The production-sized pod of webhook/benches/handler.rs.
big = copy.deepcopy(base)
big["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
                                  "prometheus.io/scrape": "true", "prometheus.io/port": "9090"}
big["spec"]["containers"] = [{
    "name": f"app-{i}", "image": f"registry.invalid/team/app-{i}:1.2.3",
    "env": [{"name": f"SETTING_{e}", "value": f"value-{e}-of-container-{i}"} for e in range(20)],
    "ports": [{"containerPort": 8080 + i, "name": "http", "protocol": "TCP"}],
    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080 + i}, "periodSeconds": 5},
    "livenessProbe": {"httpGet": {"path": "/live", "port": 8080 + i}, "periodSeconds": 10},
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
    "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}, {"name": "data", "mountPath": "/var/lib/app"}],
} for i in range(4)]
big["spec"]["volumes"] = [{"name": "config", "configMap": {"name": "app-config"}},
                          {"name": "data", "emptyDir": {}}]
pods.append(big)

for p in pods:
    write("admission_pod", compact(p))


def review(kind, resource, op, ns, name, obj, uid="uid-1"):
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": resource},
            "name": name,
            "namespace": ns,
            "operation": op,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


for p in pods[-19:-1:3] + [base]:
    write("admission_review", compact(review("Pod", "pods", "CREATE", "shop", "", p)))
write("admission_review", compact(review("Pod", "pods", "CREATE", "kube-system", "", base)))
write("admission_review", compact(review("Pod", "pods", "UPDATE", "shop", "web-1", base)))
write("admission_review", compact(review("Pod", "pods", "CREATE", "shop", "", None)))

# Policies: the sample, and core's unit-test fixtures.
policy_text = manifests("manifests/sample/policy.yaml")[0]["data"]["policy.yaml"]
with open(os.path.join(ROOT, "core/src/policy.rs")) as f:
    source = f.read()
fixtures = [policy_text]
fixtures += [m for m in re.findall(r'r#"\n(.*?)"#', source, re.S) if "interval" in m or "components" in m]
for text in fixtures:
    write("policy", text)
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "counterweight-policy", "namespace": "counterweight-system"},
          "data": {"policy.yaml": text}}
    write("admission_review", compact(review("ConfigMap", "configmaps", "CREATE",
                                             "counterweight-system", "counterweight-policy", cm)))
write("policy", "interval: 5s\nthreshold: 0.5\nretries: 0\ngateReleaseGrace: 90s\ncomponents:\n"
      "  - name: a\n    namespaces: [x]\n    selector: {matchExpressions: [{key: app, operator: Exists}]}\n"
      "    weight: 1\n    checkTimeout: 250ms\n    checks:\n"
      "      - postgres: {secretRef: {name: s, userKey: u, passwordKey: p}, maxLagBytes: 1048576}\n")
write("policy", "base: &a [x, y]\ncomponents: [*a, *a]\n")

# HA configurations: the manifest's, in YAML and JSON, and the options.
ha_text = manifests("manifests/base/controller/ha-config.yaml")[0]["data"]["ha.yaml"]
write("ha_config", ha_text)
ha = yaml.safe_load(ha_text)
write("ha_config", compact(ha))
for extra in [{"witness": "witness"}, {"preemptAfterMs": 30000},
              {"unsafePromoteOnSilence": True}, {"maxClockSkewMs": 250}]:
    h = dict(ha, **extra)
    write("ha_config", yaml.safe_dump(h))

# Peer messages: one of every body, between the members of the manifest's group.
status = {"role": "active", "serving": True, "eligible": True, "preemptReady": False}
standby = {"role": "standby", "serving": False, "eligible": True, "preemptReady": True}
bodies = [
    {"type": "probe", "sent_ms": 12000, "status": status, "lease": {"epoch": 3, "transfer": None}},
    {"type": "probe", "sent_ms": 12000, "status": standby,
     "lease": {"epoch": 4, "transfer": {"from": "east", "epoch": 3}}},
    {"type": "probe", "sent_ms": 12000, "status": standby, "lease": None},
    {"type": "probeReply", "probe_sent_ms": 12000, "status": standby,
     "lease": {"answer": "granted", "epoch": 3}},
    {"type": "probeReply", "probe_sent_ms": 12000, "status": standby,
     "lease": {"answer": "denied", "epoch": 3, "voted_epoch": 4}},
    {"type": "prepare", "epoch": 3, "reason": "switchover"},
    {"type": "prepare", "epoch": 3, "reason": "abnormal"},
    {"type": "ready", "epoch": 3},
    {"type": "refuse", "epoch": 3, "reason": "not healthy"},
    {"type": "change", "epoch": 3, "new_epoch": 4},
    {"type": "changed", "new_epoch": 4},
]
for i, body in enumerate(bodies):
    frm, to = [("west", "east"), ("east", "west"), ("witness", "east")][i % 3]
    write("peer_message", compact({"version": 1, "from": frm, "to": to, "epoch": 3, "body": body}))

# Several messages, one per line, for one node: votes from both peers for
# the restarted active east, and a handover to west.
def env(frm, to, body, epoch=3):
    return compact({"version": 1, "from": frm, "to": to, "epoch": epoch, "body": body})


write("peer_message", "\n".join([
    env("west", "east", bodies[3]),
    env("witness", "east", bodies[3]),
]))
write("peer_message", env("west", "east", bodies[4], epoch=18446744073709551615))
write("peer_message", env("west", "east", dict(bodies[3], probe_sent_ms=18446744073709551615)))
write("peer_message", "\n".join(
    env(frm, "east", dict(bodies[3], probe_sent_ms=18446744073709551615))
    for frm in ["west", "witness"]))
write("peer_message", "\n".join([
    env("east", "west", bodies[5]),
    env("east", "west", bodies[9]),
    env("east", "west", bodies[0], epoch=4),
]))

# State records: the state ConfigMap as the controller writes it, and the
# serving lease.
for text in [
    "state=active\nepoch=3\nvote={\"epoch\":3,\"to\":\"east\"}\npaused=false\n",
    "state=standby\nepoch=3\nvote={\"epoch\":4,\"to\":\"west\"}\npaused=true\n",
    "state=standby\nepoch=0\npaused=false\n",
    "cluster=east\nepoch=3\nservingUntilUnixMs=1764892800000\n",
    "cluster=west\nepoch=4\nservingUntilUnixMs=0\n",
    # The ends of the ranges, which libFuzzer's mutations rarely reach.
    "state=standby\nepoch=18446744073709551615\n",
    "state=active\nepoch=18446744073709551615\nvote={\"epoch\":18446744073709551615,\"to\":\"east\"}\n",
    "cluster=east\nepoch=18446744073709551615\nservingUntilUnixMs=18446744073709551615\n",
]:
    write("state_record", text)

# Command requests as cwctl files them (at the target's fixed instant).
for text in [
    "command=switchover\ntarget=west\nid=cwctl-1764892800-1\nrequestedAt=2026-12-04T23:59:30Z\n",
    "command=pause\nid=cwctl-2\nrequestedAt=2026-12-05T00:00:00Z\n",
    "command=resume\nid=cwctl-3\nrequestedAt=2026-12-04T23:58:00.5+00:00\n",
    "command=switchover\ntarget=west\nid=cwctl-1\nrequestedAt=2026-12-04T23:59:30Z\n"
    "handledId=cwctl-1\nresult=accepted\nhandledAt=2026-12-04T23:59:31Z\n",
]:
    write("command_request", text)

for t in sorted(os.listdir(CORPUS)):
    print(t, len(os.listdir(os.path.join(CORPUS, t))), file=sys.stderr)
