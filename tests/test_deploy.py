"""The deploy/ recipes: each Prefect Kubernetes base job template rendered as the worker renders it for a flow run
and checked (a valid work-pool template; the batch/v1 Job the worker accepts; one pod per TPU host holding all
its chips; every pod's environment one jax.distributed process group under pod 0's DNS name); the JobSet and the
headless Service; the v5e-16 profile; deploy/entrypoint.py's split between process 0 and the others.
Mutated recipes must be refused: the checks can fail."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TPU_TEMPLATE = DEPLOY / "tpu-slice" / "base-job-template.json"
GPU_TEMPLATE = DEPLOY / "gpu-node" / "base-job-template.json"
JOBSET = DEPLOY / "tpu-slice" / "jobset.yaml"
SERVICE = DEPLOY / "tpu-slice" / "headless-service.yaml"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


check = _module("check")
entrypoint = _module("entrypoint")


def _job(template: dict, values: dict | None = None) -> dict:
    return check.job_manifest(check.render(template, values), {"PREFECT__FLOW_RUN_ID": "0" * 32})


def _container(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def _env(manifest: dict) -> dict:
    return {e["name"]: e for e in _container(manifest)["env"]}


@pytest.mark.parametrize("path", [TPU_TEMPLATE, GPU_TEMPLATE], ids=["tpu-slice", "gpu-node"])
def test_templates_are_work_pool_templates(path):
    """The server's own check (every placeholder declared), a valid variables schema whose defaults validate."""
    template = json.loads(path.read_text())
    assert set(template) == {"job_configuration", "variables"}
    assert check.template_problems(template) == []
    assert check.check(path) == ([], check.job_manifest(check.render(template)))
    # every variable is used somewhere (no dead knobs)
    text = json.dumps(template["job_configuration"])
    unused = [name for name in template["variables"]["properties"] if name != "env" and f"{{{{ {name} }}}}" not in text]
    assert unused == []


def test_undeclared_placeholder_and_bad_default_are_refused():
    template = json.loads(TPU_TEMPLATE.read_text())
    broken = copy.deepcopy(template)
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    assert any("undeclared" in p and "deadline" in p for p in check.template_problems(broken))
    broken = copy.deepcopy(template)
    broken["variables"]["properties"]["hosts"]["default"] = 1  # below its own minimum of 2
    assert any("hosts" in p for p in check.template_problems(broken))


def test_tpu_slice_job_one_pod_per_host():
    template = json.loads(TPU_TEMPLATE.read_text())
    job = _job(template)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert check.worker_problems(job) == []
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["parallelism"], spec["completions"]) == ("Indexed", 4, 4)
    resources = _container(job)["resources"]
    assert resources["requests"]["google.com/tpu"] == resources["limits"]["google.com/tpu"] == 4
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    assert pod["subdomain"] == "gemstill-slice"
    env = _env(job)
    assert env["GEMSTILL_NUM_PROCESSES"]["value"] == "4"  # a string: Kubernetes refuses a number
    assert env["GEMSTILL_COORDINATOR_ADDRESS"]["value"] == "$(GEMSTILL_JOB_NAME)-0.gemstill-slice:8476"
    assert env["GEMSTILL_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/job-name']"
    )
    names = [e["name"] for e in _container(job)["env"]]
    assert names.index("GEMSTILL_JOB_NAME") < names.index("GEMSTILL_COORDINATOR_ADDRESS")  # $(...) sees only earlier
    assert "GEMSTILL_PROCESS_ID" not in env  # the pod's JOB_COMPLETION_INDEX is its process id
    assert _container(job)["args"] == ["python", "deploy/entrypoint.py", "prefect", "flow-run", "execute"]
    assert {"name": "coordinator", "containerPort": 8476} in _container(job)["ports"]
    assert check.slice_problems(job, check.variables(template)) == []


def test_tpu_slice_pods_form_one_process_group():
    """Pod i of Job <job> is host <job>-<i>; read by gemstill.distributed, pod i is process i of 4 and every pod
    dials pod 0's DNS name."""
    from gemstill.distributed import from_environment

    job = _job(json.loads(TPU_TEMPLATE.read_text()))
    labels = {"batch.kubernetes.io/job-name": "crimson-fox-x7k2q", "gemstill-slice": "gemstill-slice"}
    groups = [from_environment(check.pod_environment(job, i, labels)) for i in range(4)]
    assert [(g.index, g.count) for g in groups] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {g.coordinator for g in groups} == {"crimson-fox-x7k2q-0.gemstill-slice:8476"}
    assert all(g.local_device_ids is None for g in groups)  # each process takes every chip of its host


def test_tpu_slice_job_variables():
    template = json.loads(TPU_TEMPLATE.read_text())
    values = {"hosts": 2, "tpu_topology": "2x4", "node_pool": "slice-a", "subdomain": "v5e-8", "env": {"A": "1"}}
    job = _job(template, values)
    assert check.slice_problems(job, check.variables(template, values)) == []
    assert (job["spec"]["parallelism"], _env(job)["GEMSTILL_NUM_PROCESSES"]["value"]) == (2, "2")
    assert job["spec"]["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-nodepool"] == "slice-a"
    assert _env(job)["A"]["value"] == "1"
    # two hosts cannot hold a 4x4 slice's 16 chips
    problems, _ = check.check(TPU_TEMPLATE, {"hosts": 2})
    assert problems == ["topology 4x4 holds 16 chips, not 2 x 4"]


def test_tpu_slice_mutations_are_refused():
    template = json.loads(TPU_TEMPLATE.read_text())
    given = check.variables(template)

    def problems(mutate) -> list[str]:
        broken = copy.deepcopy(template)
        mutate(broken["job_configuration"])
        job = _job(broken)
        return check.worker_problems(job) + check.slice_problems(job, given)

    def parallelism_3(config):
        config["job_manifest"]["spec"]["parallelism"] = 3

    def env_number(config):
        config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "GEMSTILL_NUM_PROCESSES", "value": "{{ hosts }}"}
        )
        del config["env"]["GEMSTILL_NUM_PROCESSES"]

    def coordinator_order(config):
        config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"].reverse()

    def jobset(config):
        config["job_manifest"] |= {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet"}

    def two_chips(config):
        config["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = {
            "google.com/tpu": 2
        }

    def no_subdomain(config):
        del config["job_manifest"]["spec"]["template"]["spec"]["subdomain"]

    assert any("parallelism 3" in p for p in problems(parallelism_3))
    assert any("is not a string" in p for p in problems(env_number))
    assert any("expected process 0 of 4" in p for p in problems(coordinator_order))  # $(GEMSTILL_JOB_NAME) unset
    assert {"worker: /apiVersion must be 'batch/v1'", "worker: /kind must be 'Job'"} <= set(problems(jobset))
    assert any("limits google.com/tpu is 2" in p for p in problems(two_chips))
    assert any("no subdomain" in p for p in problems(no_subdomain))
    # the same process count everywhere: a job variable overriding it is caught
    problems_, _ = check.check(TPU_TEMPLATE, {"env": {"GEMSTILL_NUM_PROCESSES": "3"}})
    assert any("pod 3" in p and "out of range" in p for p in problems_)


def test_headless_service_selects_the_slice_pods():
    service = yaml.safe_load(SERVICE.read_text())
    job = _job(json.loads(TPU_TEMPLATE.read_text()))
    assert check.service_problems(service, job) == []
    assert service["spec"]["publishNotReadyAddresses"] is True
    other = _job(json.loads(TPU_TEMPLATE.read_text()), {"subdomain": "other"})
    assert check.service_problems(service, other) != []


def test_gpu_node_job_one_process_all_gpus():
    template = json.loads(GPU_TEMPLATE.read_text())
    job = _job(template, {"gpus": 4})
    assert check.worker_problems(job) == []
    assert (job["spec"]["parallelism"], job["spec"]["completions"]) == (1, 1)
    resources = _container(job)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 4
    assert not any(name.startswith("GEMSTILL_") for name in _env(job))  # one process: no group to join
    assert _container(job)["args"] == ["prefect", "flow-run", "execute"]  # the worker's own command
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert check.gpu_node_problems(job, check.variables(template, {"gpus": 4})) == []
    broken = copy.deepcopy(template)
    _container(broken["job_configuration"]["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] = 8
    job = _job(broken, {"gpus": 4})
    assert check.gpu_node_problems(job, check.variables(broken, {"gpus": 4})) == [
        "limits nvidia.com/gpu is 8, not gpus (4)"
    ]


@pytest.mark.parametrize(("processes", "ok"), [("8", True), ("4", False)])
def test_gpu_node_one_process_per_gpu_variant(processes, ok):
    """The variant the README shows: gemstill launch starts one process per GPU in the pod; --processes times
    --devices-per-process must be the GPUs the pod holds, and process 0 runs the flow run through the entrypoint."""
    template = json.loads(GPU_TEMPLATE.read_text())
    _container(template["job_configuration"]["job_manifest"])["args"] = [
        *("gemstill", "launch", "--processes", processes, "--devices-per-process", "1", "--"),
        *("python", "deploy/entrypoint.py", "prefect", "flow-run", "execute"),
    ]
    problems = check.gpu_node_problems(_job(template), check.variables(template))
    assert problems == ([] if ok else ["gemstill launch: 4 processes x 1 devices per process must be gpus (8)"])


def test_jobset_one_slice_coordinator_is_pod_zero():
    jobset = yaml.safe_load(JOBSET.read_text())
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert jobset["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == (
        "cloud.google.com/gke-nodepool"
    )
    assert check.jobset_problems(jobset) == []
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain = the JobSet's name>
    assert env == {
        "GEMSTILL_COORDINATOR_ADDRESS": "gemstill-v5e-16-slice-0-0.gemstill-v5e-16:8476",
        "GEMSTILL_NUM_PROCESSES": "4",
    }
    assert container["command"][:3] == ["gemstill", "run", "v5e-16"]
    broken = copy.deepcopy(jobset)
    broken["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] = 3
    assert any("parallelism 3" in p for p in check.jobset_problems(broken))
    broken = copy.deepcopy(jobset)
    broken["spec"]["replicatedJobs"][0]["name"] = "workers"  # the coordinator's name no longer matches
    assert any(
        "expected process 0 of 4 with coordinator gemstill-v5e-16-workers-0-0" in p
        for p in check.jobset_problems(broken)
    )


def test_v5e16_profile_loads_and_fits_the_slice(tmp_path):
    from gemstill.pipeline.plan import make_plan
    from gemstill.pipeline.profile import load_profile

    profile, path = load_profile("v5e-16")
    assert path == REPO / "profiles" / "v5e-16.yaml"
    assert profile.hardware.platform == "tpu"
    mesh = profile.hardware.mesh
    assert mesh.data * mesh.fsdp * mesh.tensor == mesh.devices == 16
    tpu = check.variables(json.loads(TPU_TEMPLATE.read_text()))
    assert tpu["hosts"] * tpu["chips_per_host"] == 16  # the slice the TPU pool's defaults describe
    assert profile.training.batch_size % mesh.data == 0
    plan = make_plan("v5e-16", store=str(tmp_path / "store"), inspect=True)  # its data is on the slice, not here
    for name in plan.stages:  # every stage's estimate fits a v5e chip
        total = plan.memory(name).get("total", 0)
        assert total <= profile.hardware.memory_per_device_gib * 2**30, (name, total / 2**30)


def test_prefect_yaml_deploys_the_stage_flow_to_each_pool():
    spec = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    workdirs = {check.variables(json.loads(p.read_text()))["workdir"] for p in (TPU_TEMPLATE, GPU_TEMPLATE)}
    assert [step["prefect.deployments.steps.set_working_directory"]["directory"] for step in spec["pull"]] == [
        *workdirs
    ]
    for deployment in spec["deployments"]:
        # the distill flow starts gemstill-stage/<work_pool>: the deployment is named after its pool
        assert deployment["name"] == deployment["work_pool"]["name"]
        assert deployment["entrypoint"] == "flows/stage.py:one_stage"
    assert (REPO / "flows" / "stage.py").is_file()


def test_entrypoint_process_zero_runs_prefect_the_others_follow():
    from gemstill.errors import GemstillError

    group = {"GEMSTILL_COORDINATOR_ADDRESS": "gemstill-0.slice:8476", "GEMSTILL_NUM_PROCESSES": "4"}
    assert entrypoint.process_id({}) == 0
    assert entrypoint.process_id({**group, "JOB_COMPLETION_INDEX": "3"}) == 3
    assert entrypoint.process_id({**group, "JOB_COMPLETION_INDEX": "3", "GEMSTILL_PROCESS_ID": "1"}) == 1
    ran, followed = [], []
    command = ["prefect", "flow-run", "execute"]
    for index in ("0", "2"):
        env = {**group, "JOB_COMPLETION_INDEX": index}
        entrypoint.main(command, env, execute=ran.append, follower=followed.append)
    assert ran == [command] and followed == [{**group, "JOB_COMPLETION_INDEX": "2"}]
    with pytest.raises(GemstillError, match="JOB_COMPLETION_INDEX='x' is not a non-negative integer"):
        entrypoint.process_id({**group, "JOB_COMPLETION_INDEX": "x"})


def test_follower_runs_the_flow_runs_stage(monkeypatch, tmp_path):
    import gemstill.pipeline.plan as plan_module
    from gemstill.errors import GemstillError

    calls = []
    monkeypatch.setattr(plan_module, "run_stage", lambda plan, name, fresh, log: calls.append((plan, name, fresh)))
    monkeypatch.setenv("GEMSTILL_STORES", str(tmp_path))  # the worker's store root: the request's store lies under it
    env = {"PREFECT__FLOW_RUN_ID": "4c1e0a7e-0000-4000-8000-000000000000", "JOB_COMPLETION_INDEX": "1"}
    store = str(tmp_path / "store")
    key = plan_module.make_plan("tiny", store=store).stages["prepare_data"].key
    request = {"profile": "tiny", "stage": "prepare_data", "store": store, "planned_key": key}
    entrypoint.follow(env, read=lambda run_id: ("gemstill-stage", {"request": request}, True))
    [(plan, name, fresh)] = calls
    assert (plan.profile.name, name, fresh, plan.store.root) == ("tiny", "prepare_data", False, store)
    with pytest.raises(GemstillError, match="the flow planned"):
        entrypoint.follow(
            env, read=lambda run_id: ("gemstill-stage", {"request": {**request, "planned_key": "x"}}, True)
        )
    with pytest.raises(SystemExit, match="runs only gemstill-stage"):
        entrypoint.follow(env, read=lambda run_id: ("distill", {"profile": "tiny"}, True))
    with pytest.raises(SystemExit, match="PREFECT__FLOW_RUN_ID"):
        entrypoint.follow({"JOB_COMPLETION_INDEX": "1"})
    assert len(calls) == 1


def test_check_command(capsys):
    assert check.main([str(TPU_TEMPLATE)]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert check.main([str(TPU_TEMPLATE), "--set", "hosts=2", "--set", "tpu_topology=2x4", "--print"]) == 0
    assert json.loads(capsys.readouterr().out.rpartition("\nok")[0])["spec"]["parallelism"] == 2
    assert check.main([str(JOBSET)]) == 0
    capsys.readouterr()
    assert check.main([str(GPU_TEMPLATE), "--set", "gpus=0"]) == 1
    assert "less than the minimum" in capsys.readouterr().out


def test_the_real_kubernetes_worker_accepts_the_slice_job():
    """Where prefect-kubernetes is installed (it is not a dependency): its own configuration class renders the
    template, prepares it for a flow run and refuses a JobSet."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    import uuid

    from prefect.client.schemas.objects import FlowRun

    template = json.loads(TPU_TEMPLATE.read_text())
    config = worker.KubernetesWorkerJobConfiguration(**check.render(template))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="crimson-fox"))
    job = config.job_manifest
    assert job["metadata"]["generateName"] == "crimson-fox-"
    assert check.slice_problems(job, check.variables(template)) == []
    broken = check.render(template)
    broken["job_manifest"] |= {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet"}
    with pytest.raises(ValueError, match="must have value 'batch/v1'"):
        worker.KubernetesWorkerJobConfiguration(**broken)
