"""Render a deploy/ recipe as Kubernetes would get it, and check it against the multi-host contract.

    python deploy/check.py deploy/tpu-slice/base-job-template.json [--set hosts=2 --set tpu_topology=2x4] [--print]
    python deploy/check.py deploy/gpu-node/base-job-template.json --set gpus=4
    python deploy/check.py deploy/tpu-slice/jobset.yaml

Prints each problem and exits 1, or prints "ok" (with --print, the Job the worker would create, as JSON).

A base job template is rendered the way Prefect's Kubernetes worker renders it for a flow run: the variables'
defaults, then the values given (a deployment's or a stage's job_variables); a `job_configuration.env` dict merged
with the `env` variable; placeholders filled by Prefect's own apply_values (prefect.workers.base.
BaseJobConfiguration.from_template_and_values); then the worker's own steps before it creates the Job: its
environment first in the container's env list, the template's own entries after it, and the refusal of any
manifest that is not a batch/v1 Job with the fields of its base manifest (prefect_kubernetes.worker,
KubernetesWorkerJobConfiguration._populate_env_in_manifest and _validate_job_manifest, prefect-kubernetes 0.8.0).
The pods are then simulated: each one's environment as the kubelet expands it (downward-API labels, $(VAR)
references, JOB_COMPLETION_INDEX), read by gemstill.distributed.from_environment, must form one process group
whose coordinator is pod 0's DNS name.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

# prefect_kubernetes.worker._get_base_job_manifest(): the worker refuses a manifest lacking any of these fields or
# holding another value in one (yes, parallelism and completions inside the pod spec: the worker demands them)
WORKER_BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"annotations": {}, "labels": {}},
    "spec": {
        "template": {
            "spec": {
                "parallelism": 1,
                "completions": 1,
                "restartPolicy": "Never",
                "containers": [{"name": "prefect-job"}],
            }
        }
    },
}
WORKER_COMMAND = ["prefect", "flow-run", "execute"]  # BaseJobConfiguration._base_flow_run_command()
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods (Kubernetes >= 1.27)
TPU = "google.com/tpu"
GPU = "nvidia.com/gpu"
TPU_NODE_LABELS = ("cloud.google.com/gke-tpu-accelerator", "cloud.google.com/gke-tpu-topology")
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
PROCESS_GROUP_ENV = ("GEMSTILL_COORDINATOR_ADDRESS", "GEMSTILL_NUM_PROCESSES", "GEMSTILL_PROCESS_ID")


def load(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)


# ------------------------------------------------------------------------------------------------ the work pool


def template_problems(template: dict[str, Any]) -> list[str]:
    """What the Prefect server would refuse in `prefect work-pool create --base-job-template`, and a variables
    schema whose own defaults do not validate."""
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import is_valid_schema, validate

    try:
        validate_base_job_template(template)
    except ValueError as err:
        return [f"work pool: {err}"]
    schema = template["variables"]
    try:
        is_valid_schema(schema)
    except ValueError as err:
        return [f"variables: {err}"]
    errors = validate(variables(template), schema)
    return [f"variables: default {'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def variables(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variables a flow run's job is rendered with: the defaults that are not null, then `values`."""
    properties = template["variables"].get("properties", {})
    defaults = {k: p["default"] for k, p in properties.items() if p.get("default") is not None}
    return {**defaults, **(values or {})}


def render(template: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job configuration for a flow run with these job variables, as from_template_and_values makes it."""
    from prefect.utilities.templating import apply_values

    config = copy.deepcopy(template["job_configuration"])
    given = variables(template, values)
    if isinstance(config.get("env"), dict) and given.get("env"):
        config["env"] = config["env"] | given["env"]
    return apply_values(config, given)


def job_manifest(config: dict[str, Any], worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Job the worker submits for a rendered configuration: the configuration's env (values as strings, the
    worker's own `worker_env` first) ahead of the template's own entries, and Prefect's command where none is set."""
    manifest = copy.deepcopy(config["job_manifest"])
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = {**(worker_env or {}), **(config.get("env") or {})}
    entries = [{"name": k, "value": None if v is None else str(v)} for k, v in env.items()]
    own = container.get("env")
    if isinstance(own, list):
        entries += [e for e in own if e.get("name") not in env]
    container["env"] = entries
    container.setdefault("args", list(WORKER_COMMAND))
    if manifest.get("metadata", {}).get("generateName") in (None, "", "-", "None-"):
        manifest.setdefault("metadata", {})["generateName"] = "prefect-job-"
    return manifest


def worker_problems(manifest: dict[str, Any]) -> list[str]:
    """What the Kubernetes worker refuses before creating the Job (its _validate_job_manifest: a JSON patch from
    the manifest to its base manifest may only remove fields, never add or change one)."""
    import jsonpatch

    manifest = copy.deepcopy(manifest)
    metadata = manifest.setdefault("metadata", {})
    metadata.setdefault("annotations", {})
    metadata.setdefault("labels", {})
    patch = jsonpatch.JsonPatch.from_diff(manifest, WORKER_BASE_MANIFEST)
    problems = [f"worker: the Job lacks {op['path']}" for op in patch if op["op"] == "add"]
    problems += [f"worker: {op['path']} must be {op['value']!r}" for op in patch if op["op"] == "replace"]
    return problems


# ------------------------------------------------------------------------------------------------ the pods


def _pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return _pod_spec(manifest)["containers"][0]


def pod_environment(manifest: dict[str, Any], index: int, labels: dict[str, str]) -> dict[str, str]:
    """The environment pod `index` of an Indexed Job sees: the container's env list expanded by the kubelet
    (fieldRef labels from `labels`, $(VAR) of a variable defined earlier in the list; others left as written)."""
    env: dict[str, str] = {}
    if manifest["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)
    for entry in _container(manifest).get("env") or []:
        if "valueFrom" in entry:
            path = entry["valueFrom"].get("fieldRef", {}).get("fieldPath", "")
            match = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            if match is None or match.group(1) not in labels:
                raise ValueError(f"env {entry['name']}: {path!r} is not a label the pod carries")
            env[entry["name"]] = labels[match.group(1)]
        elif entry.get("value") is not None:
            value = entry["value"]
            if not isinstance(value, str):
                raise ValueError(f"env {entry['name']}: {value!r} is not a string (Kubernetes refuses the Job)")
            env[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)
    return env


def process_group_problems(pod_envs: list[dict[str, str]], coordinator: str) -> list[str]:
    """The pods' environments, read by gemstill.distributed, must name one group: pod i is process i of
    len(pod_envs), all with `coordinator` (process 0's DNS name and port)."""
    from gemstill.distributed import from_environment
    from gemstill.errors import GemstillError

    problems = []
    for i, env in enumerate(pod_envs):
        try:
            group = from_environment(env)
        except GemstillError as err:
            problems.append(f"pod {i}: {err}")
            continue
        if group is None:
            problems.append(f"pod {i}: its environment names no process group ({', '.join(PROCESS_GROUP_ENV)})")
            continue
        seen = (group.coordinator, group.count, group.index)
        if seen != (coordinator, len(pod_envs), i):
            problems.append(
                f"pod {i}: process {group.index} of {group.count} with coordinator {group.coordinator}, "
                f"expected process {i} of {len(pod_envs)} with coordinator {coordinator}"
            )
    return problems


def _tpu_problems(pod: dict[str, Any], chips: int, topology: str | None, hosts: int, accelerator: str | None) -> list:
    problems = []
    resources = pod["containers"][0].get("resources", {})
    for kind in ("requests", "limits"):
        if resources.get(kind, {}).get(TPU) != chips:
            problems.append(f"{kind} {TPU} is {resources.get(kind, {}).get(TPU)!r}, not {chips} (chips per host)")
    selector = pod.get("nodeSelector") or {}
    problems += [f"nodeSelector lacks {label}" for label in TPU_NODE_LABELS if not selector.get(label)]
    if topology is not None and selector.get(TPU_NODE_LABELS[1]) != topology:
        problems.append(f"nodeSelector topology is {selector.get(TPU_NODE_LABELS[1])!r}, not {topology!r}")
    if accelerator is not None and selector.get(TPU_NODE_LABELS[0]) != accelerator:
        problems.append(f"nodeSelector accelerator is {selector.get(TPU_NODE_LABELS[0])!r}, not {accelerator!r}")
    shape = selector.get(TPU_NODE_LABELS[1], "")
    if re.fullmatch(r"\d+(x\d+)+", shape) and math.prod(map(int, shape.split("x"))) != hosts * chips:
        problems.append(f"topology {shape} holds {math.prod(map(int, shape.split('x')))} chips, not {hosts} x {chips}")
    return problems


def _port_problems(container: dict[str, Any], port: int) -> list[str]:
    ports = [p.get("containerPort") for p in container.get("ports") or []]
    return [] if port in ports else [f"the container does not declare the coordinator port {port} ({ports})"]


def slice_problems(manifest: dict[str, Any], given: dict[str, Any], job_name: str = "gemstill-x7k2q") -> list[str]:
    """A work pool's TPU slice Job (variables `given`): one pod per host, every chip of it, all pods one process
    group under pod 0's DNS name; process 0 runs Prefect's command through deploy/entrypoint.py."""
    hosts, chips, port = given["hosts"], given["chips_per_host"], given["coordinator_port"]
    spec, pod = manifest["spec"], _pod_spec(manifest)
    container = pod["containers"][0]
    problems = []
    if spec.get("completionMode") != "Indexed":
        problems.append("the Job is not Indexed: its pods have no JOB_COMPLETION_INDEX and no stable hostnames")
    if (spec.get("parallelism"), spec.get("completions")) != (hosts, hosts):
        problems.append(
            f"parallelism {spec.get('parallelism')} and completions {spec.get('completions')} must both be "
            f"hosts ({hosts}): one pod per host, all at once"
        )
    problems += _tpu_problems(pod, chips, given.get("tpu_topology"), hosts, given.get("tpu_accelerator"))
    problems += _port_problems(container, port)
    if not pod.get("subdomain"):
        problems.append("the pod spec sets no subdomain: the pods get no DNS names")
    args = container.get("args") or []
    if args[:2] != ["python", "deploy/entrypoint.py"] or args[2:] != WORKER_COMMAND:
        problems.append(f"args {args}: process 0 must run {' '.join(WORKER_COMMAND)} through deploy/entrypoint.py")
    if problems:
        return problems
    labels = {JOB_NAME_LABEL: job_name, **(manifest["spec"]["template"].get("metadata", {}).get("labels") or {})}
    try:
        envs = [pod_environment(manifest, i, labels) for i in range(hosts)]
    except ValueError as err:
        return [str(err)]
    # an Indexed Job's pod i is named <job>-<i> (hostname) under the pod spec's subdomain
    return process_group_problems(envs, f"{job_name}-0.{pod['subdomain']}:{port}")


def service_problems(service: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The headless Service must select the Job's pods under the name their subdomain gives."""
    pod_labels = manifest["spec"]["template"].get("metadata", {}).get("labels") or {}
    spec = service.get("spec", {})
    problems = []
    if service.get("kind") != "Service" or spec.get("clusterIP") != "None":
        problems.append("not a headless Service (kind Service, clusterIP None)")
    if service.get("metadata", {}).get("name") != _pod_spec(manifest).get("subdomain"):
        problems.append(
            f"Service {service.get('metadata', {}).get('name')!r} is not the pods' subdomain "
            f"{_pod_spec(manifest).get('subdomain')!r}"
        )
    selector = spec.get("selector") or {}
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        problems.append(f"selector {selector} does not match the pods' labels {pod_labels}")
    return problems


def _launch_counts(args: list[str]) -> tuple[int | None, int | None, list[str]]:
    """--processes, --devices-per-process and the command of `gemstill launch ... -- COMMAND`."""
    head = args[2 : args.index("--")] if "--" in args else args[2:]
    command = args[args.index("--") + 1 :] if "--" in args else []
    options: dict[str, str] = {}
    for i, word in enumerate(head):
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            options[name] = value if eq else (head[i + 1] if i + 1 < len(head) else "")
    count = {k: int(v) if v.isdigit() else None for k, v in options.items()}
    return count.get("--processes"), count.get("--devices-per-process"), command


def gpu_node_problems(manifest: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """A work pool's multi-GPU node Job: one pod holding `gpus` GPUs, driven by one process (the worker's own
    command), or by `gemstill launch --processes P --devices-per-process D -- python deploy/entrypoint.py
    prefect flow-run execute` with P x D = gpus (process 0 runs the flow run, the others follow it)."""
    spec, pod = manifest["spec"], _pod_spec(manifest)
    container = pod["containers"][0]
    gpus = given["gpus"]
    problems = []
    if (spec.get("parallelism", 1), spec.get("completions", 1)) != (1, 1):
        problems.append(f"parallelism {spec.get('parallelism')} / completions {spec.get('completions')}: one pod")
    resources = container.get("resources", {})
    for kind in ("requests", "limits"):
        if resources.get(kind, {}).get(GPU) != gpus:
            problems.append(f"{kind} {GPU} is {resources.get(kind, {}).get(GPU)!r}, not gpus ({gpus})")
    group_env = sorted({e.get("name") for e in container.get("env") or []} & set(PROCESS_GROUP_ENV))
    if group_env:
        problems.append(f"{group_env} set on the pod: its processes' group is one process or gemstill launch's")
    args = container.get("args") or []
    if args[:2] == ["gemstill", "launch"]:
        processes, devices, command = _launch_counts(args)
        if processes is None or devices is None or processes * devices != gpus:
            problems.append(
                f"gemstill launch: {processes} processes x {devices} devices per process must be gpus ({gpus})"
            )
        if command != ["python", "deploy/entrypoint.py", *WORKER_COMMAND]:
            problems.append(f"gemstill launch runs {command}: process 0 must run the flow run through the entrypoint")
    elif args != WORKER_COMMAND:
        problems.append(f"args {args}: the worker's {' '.join(WORKER_COMMAND)}, or gemstill launch of it")
    return problems


def jobset_problems(jobset: dict[str, Any]) -> list[str]:
    """A JobSet of one TPU slice: one replicated Job, Indexed, one pod per host, all pods one process group whose
    coordinator is <jobset>-<replicatedJob>-0-0.<subdomain> (the subdomain defaults to the JobSet's name)."""
    problems = []
    if (jobset.get("apiVersion"), jobset.get("kind")) != (JOBSET_API, "JobSet"):
        return [f"{jobset.get('apiVersion')}/{jobset.get('kind')} is not a {JOBSET_API} JobSet"]
    name = jobset["metadata"]["name"]
    if not (jobset["metadata"].get("annotations") or {}).get(EXCLUSIVE_TOPOLOGY):
        problems.append(f"no {EXCLUSIVE_TOPOLOGY} annotation: a slice's pods may land on several node pools")
    network = jobset["spec"].get("network") or {}
    if network.get("enableDNSHostnames") is False:
        problems.append("network.enableDNSHostnames is false: the pods get no DNS names")
    subdomain = network.get("subdomain") or name
    replicated = jobset["spec"]["replicatedJobs"]
    if len(replicated) != 1 or replicated[0].get("replicas", 1) != 1:
        return [*problems, "a slice is one replicated Job of one replica"]
    job = {"spec": copy.deepcopy(replicated[0]["template"]["spec"])}
    job["spec"].setdefault("completionMode", "Indexed")  # JobSet's webhook default
    spec, pod = job["spec"], _pod_spec(job)
    hosts = spec.get("completions")
    if spec["completionMode"] != "Indexed" or spec.get("parallelism") != hosts:
        problems.append(f"parallelism {spec.get('parallelism')} / completions {hosts}: Indexed, one pod per host")
    container = pod["containers"][0]
    problems += _tpu_problems(pod, container.get("resources", {}).get("limits", {}).get(TPU), None, hosts, None)
    ports = [p.get("containerPort") for p in container.get("ports") or [] if p.get("name") == "coordinator"]
    if not ports:
        problems.append("the container declares no port named coordinator")
    if problems:
        return problems
    try:
        envs = [pod_environment(job, i, {}) for i in range(hosts)]
    except ValueError as err:
        return [str(err)]
    # the Job of replica 0 is <jobset>-<replicatedJob>-0, so its pod 0 is <jobset>-<replicatedJob>-0-0
    return process_group_problems(envs, f"{name}-{replicated[0]['name']}-0-0.{subdomain}:{ports[0]}")


# ------------------------------------------------------------------------------------------------ the command


def check(path: str | Path, values: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any] | None]:
    """The problems of a recipe file, and the Job a base job template renders to (None for a JobSet)."""
    document = load(path)
    if document.get("kind") == "JobSet":
        return jobset_problems(document), None
    problems = template_problems(document)
    if problems:
        return problems, None
    from prefect.utilities.schema_tools import validate

    given = variables(document, values)
    errors = validate(given, document["variables"])  # as the server checks a deployment's job variables
    if errors:
        return [f"job variable {'/'.join(map(str, e.path))}: {e.message}" for e in errors], None
    manifest = job_manifest(render(document, values))
    problems = worker_problems(manifest)
    limits = _container(manifest).get("resources", {}).get("limits", {})
    if TPU in limits:
        problems += slice_problems(manifest, given)
        service_path = Path(path).with_name("headless-service.yaml")
        if service_path.exists():
            problems += service_problems(load(service_path), manifest)
    elif GPU in limits:
        problems += gpu_node_problems(manifest, given)
    else:
        problems.append(f"the container requests neither {TPU} nor {GPU}")
    return problems, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a base-job-template.json or a JobSet YAML")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="a job variable (YAML)")
    parser.add_argument("--print", action="store_true", help="print the rendered Job")
    args = parser.parse_args(argv)
    values = {}
    for item in args.set:
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    problems, manifest = check(args.path, values)
    for problem in problems:
        print(f"{args.path}: {problem}")
    if args.print and manifest is not None:
        print(json.dumps(manifest, indent=2))
    if not problems:
        print("ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
