"""Model corruption recovery: a small numpy model in a versioned bucket on moto, Jobs and Deployments on kmock."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from blocks.errors import InvalidInput
from blocks.models import GoldenCheck, ModelRegistry, ModelRegistryError, load_numpy_mlp
from runbook.evidence import load_report
from tests.fixtures_kube import seed_deployment, seed_job


def build_model(folder: Path, seed: int, golden_seed: int | None = None, dims: tuple = (8, 16, 3)) -> Path:
    """A two-layer perceptron (weights.npz) and its golden inputs/outputs (golden.npz) in ``folder``.

    With ``golden_seed`` the golden outputs come from other weights: a model that fails its check.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def weights(s: int) -> dict:
        rng = np.random.default_rng(s)
        return {"W0": rng.normal(size=dims[:2]), "b0": rng.normal(size=dims[1]),
                "W1": rng.normal(size=dims[1:]), "b1": rng.normal(size=dims[2])}

    np.savez(folder / "weights.npz", **weights(seed))
    inputs = np.random.default_rng(seed + 1000).normal(size=(32, dims[0]))
    reference = weights(golden_seed if golden_seed is not None else seed)
    outputs = np.maximum(inputs @ reference["W0"] + reference["b0"], 0) @ reference["W1"] + reference["b1"]
    np.savez(folder / "golden.npz", inputs=inputs, outputs=outputs)
    return folder


@pytest.fixture(scope="module")
def registry_session(moto_endpoint, prefect_api):
    """One saved ModelRegistry and RecoveryObjectives (with 'ml-models') for the module: (names, block)."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from prefect_aws.s3 import S3Bucket

    from blocks import Objective, RecoveryObjectives

    restore = tempfile.mkdtemp(prefix="dr-models-")
    credentials = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                                 aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))
    block = ModelRegistry(bucket=S3Bucket(bucket_name=f"ml-{uuid.uuid4().hex[:8]}", credentials=credentials),
                          prefix="models", restore_directory=restore, environment="sandbox")
    name = f"ml-{uuid.uuid4().hex[:8]}"
    block.save(name)
    objectives = RecoveryObjectives()
    objectives.functions["ml-models"] = Objective(rto_seconds=7200, rpo_seconds=86400, priority="P2")
    objectives_name = f"obj-{uuid.uuid4().hex[:8]}"
    objectives.save(objectives_name)
    yield {"registry": name, "objectives": objectives_name}, block
    shutil.rmtree(restore, ignore_errors=True)


@pytest.fixture
def registry(registry_session, aws, tmp_path):
    """The module's registry on a clean moto account, with ``ranker`` v1 and v2 published, production on v2."""
    names, block = registry_session
    s3 = aws.get_client("s3")
    s3.create_bucket(Bucket=block.bucket_name)
    s3.put_bucket_versioning(Bucket=block.bucket_name, VersioningConfiguration={"Status": "Enabled"})
    model = f"ranker-{uuid.uuid4().hex[:6]}"
    for version, seed in (("v1", 1), ("v2", 2)):
        block.publish_version(model, version, build_model(tmp_path / version, seed), GoldenCheck(tolerance=1e-9))
    block.flip_pointer(model, "v2")
    return {**names, "block": block, "model": model, "s3": s3, "tmp": tmp_path}


def run(reg, **params):
    from flows.model_corruption import model_corruption

    base = dict(registry_block=reg["registry"], model=reg["model"], objectives_block=reg["objectives"],
                approval_policy="auto", drill=True)
    base.update(params)
    state = model_corruption(**base, return_state=True)
    return state, load_report(state.state_details.flow_run_id)


def corrupt(reg, key: str) -> bytes:
    """Overwrite ``key`` with its bytes, one flipped (the damaged object becomes the current version)."""
    s3, bucket = reg["s3"], reg["block"].bucket_name
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    return bytes(body)


def sha(reg, key: str) -> str:
    return hashlib.sha256(reg["s3"].get_object(Bucket=reg["block"].bucket_name, Key=key)["Body"].read()).hexdigest()


def test_recovery_restores_damaged_artifacts_stops_training_and_restarts_serving(registry, kube):
    reg, block = registry, registry["block"]
    seed_job(kube, "ppo-training")
    seed_job(kube, "nightly-report")
    seed_deployment(kube, "optimizer")
    kube_name = f"kube-{uuid.uuid4().hex[:8]}"
    kube.save(kube_name)
    weights_key = f"models/{reg['model']}/v1/weights.npz"
    good = sha(reg, weights_key)
    corrupt(reg, weights_key)  # the incident: a training job overwrote v1's weights with garbage

    state, report = run(reg, version="v1", kube_block=kube_name, training_job_selector="app=ppo-training",
                        serving_deployments=["optimizer"], rollout_timeout_seconds=10)

    assert state.name == "Recovered", report.summary
    assert block.production_version(reg["model"])[0] == "v1"
    assert report.promotion["previous"] == "v2" and report.promotion["current"] == "v1"
    assert report.promotion["repaired_objects"] == [weights_key]
    assert sha(reg, weights_key) == good  # the verified object version is current again
    assert report.candidate["damaged"] == ["weights.npz"]
    golden = next(c for c in report.checks if c.name == "golden outputs")
    assert golden.passed and "32 golden inputs" in golden.detail
    jobs = {j["name"]: j["suspended"] for j in kube.list_jobs()}
    assert jobs == {"ppo-training": True, "nightly-report": False}
    annotations = kube.get_deployment("optimizer")["spec"]["template"]["metadata"].get("annotations") or {}
    assert "kubectl.kubernetes.io/restartedAt" in annotations
    assert kube.rollout_status("optimizer").complete
    assert all(c.passed for c in report.checks)
    assert report.rpo_seconds is not None and report.rpo_objective_seconds == 86400

    # A second run of the same recovery changes nothing more: the pointer is already flipped.
    state, again = run(reg, version="v1")
    assert state.name == "Recovered" and again.promotion["already"] and again.promotion["repaired_objects"] == []


def test_bad_inputs_are_refused_before_any_change(registry, kube):
    reg, block = registry, registry["block"]
    seed_job(kube, "ppo-training")
    kube_name = f"kube-{uuid.uuid4().hex[:8]}"
    kube.save(kube_name)
    model = reg["model"]
    # v3: a manifest that does not match its weights
    block.publish_version(model, "v3", build_model(reg["tmp"] / "v3", 3), GoldenCheck())
    manifest_key = f"models/{model}/v3/manifest.json"
    manifest = json.loads(reg["s3"].get_object(Bucket=block.bucket_name, Key=manifest_key)["Body"].read())
    manifest["artifacts"]["weights.npz"]["sha256"] = "0" * 64
    reg["s3"].put_object(Bucket=block.bucket_name, Key=manifest_key, Body=json.dumps(manifest).encode())
    # v4: weights corrupted and the good object version lost: no copy matches
    block.publish_version(model, "v4", build_model(reg["tmp"] / "v4", 4), GoldenCheck())
    weights_key = f"models/{model}/v4/weights.npz"
    original = reg["s3"].head_object(Bucket=block.bucket_name, Key=weights_key)["VersionId"]
    corrupt(reg, weights_key)
    reg["s3"].delete_object(Bucket=block.bucket_name, Key=weights_key, VersionId=original)

    cases = {
        "unknown version": (dict(version="v9"), "has no version 'v9'"),
        "empty backup prefix": (dict(model="never-backed-up", version="v1"), "no version of model 'never-backed-up'"),
        "manifest mismatch": (dict(version="v3"), "none of its 1 stored versions matches the manifest"),
        "corrupted artifact": (dict(version="v4"), "none of its 1 stored versions matches the manifest"),
    }
    for case, (params, expected) in cases.items():
        state, report = run(reg, kube_block=kube_name, training_job_selector="app=ppo-training", **params)
        assert state.is_failed() and report.outcome == "Refused", (case, report.summary)
        assert expected in report.summary, (case, report.summary)
        assert block.production_version(model)[0] == "v2", case
        assert kube.list_jobs()[0]["suspended"] is False, case


def test_a_model_failing_its_golden_check_is_never_promoted(registry):
    reg, block = registry, registry["block"]
    block.publish_version(reg["model"], "v5", build_model(reg["tmp"] / "v5", 5, golden_seed=6), GoldenCheck())
    state, report = run(reg, version="v5")
    assert state.name == "VerificationFailed", report.summary
    golden = next(c for c in report.checks if c.name == "golden outputs")
    assert not golden.passed and "max abs error" in golden.detail
    assert block.production_version(reg["model"])[0] == "v2"
    assert report.promotion is None and not report.approvals


def test_dry_run_records_the_plan_and_changes_nothing(registry):
    reg, block = registry, registry["block"]
    weights_key = f"models/{reg['model']}/v1/weights.npz"
    corrupt(reg, weights_key)
    before = sha(reg, weights_key)
    state, report = run(reg, version="v1", dry_run=True)
    assert state.name == "DryRun"
    assert any("PRODUCTION: v2 -> v1" in p for p in report.plan)
    assert block.production_version(reg["model"])[0] == "v2" and sha(reg, weights_key) == before


def test_pointer_flip_is_compare_and_swap_and_keeps_history(registry):
    reg, block = registry, registry["block"]
    model = reg["model"]
    flip = block.flip_pointer(model, "v1", expected_previous="v2")
    assert (flip.previous, flip.current, flip.already) == ("v2", "v1", False)
    assert block.flip_pointer(model, "v1").already
    with pytest.raises(ModelRegistryError, match="changed to 'v1' since it was read as 'v2'"):
        block.flip_pointer(model, "v2", expected_previous="v2")
    versions = reg["s3"].list_object_versions(Bucket=block.bucket_name, Prefix=block.pointer_key(model))["Versions"]
    history = {reg["s3"].get_object(Bucket=block.bucket_name, Key=v["Key"], VersionId=v["VersionId"])["Body"].read():
               v["IsLatest"] for v in versions}
    assert history == {b"v2": False, b"v1": True}  # the previous value stays as an older object version
    with pytest.raises(InvalidInput, match="not a plain name"):
        block.flip_pointer(model, "../v1")


def test_numpy_loader_reproduces_the_golden_outputs(tmp_path):
    from blocks.models import Manifest

    folder = build_model(tmp_path / "m", 7)
    predict = load_numpy_mlp(folder, Manifest(model="m", version="v", artifacts={}))
    with np.load(folder / "golden.npz") as golden:
        assert np.allclose(predict(golden["inputs"]), golden["outputs"], atol=1e-12)


def test_no_approval_in_time_promotes_nothing(registry):
    reg, block = registry, registry["block"]
    state, report = run(reg, version="v1", approval_policy="required", allowed_approvers=["alice"], drill=False,
                        approval_timeout_seconds=2, approval_poll_seconds=0.5)
    assert state.name == "ApprovalTimedOut", report.summary
    assert block.production_version(reg["model"])[0] == "v2" and report.promotion is None
    assert all(c.passed for c in report.checks if c.stage == "restored")


def test_objects_damaged_while_awaiting_approval_are_never_promoted(registry, kube):
    """Training keeps writing during the approval wait: Jobs are only suspended before the yes, and an object
    that no longer matches the manifest after the repair stops the run before the pointer flip and the restart."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    reg, block = registry, registry["block"]
    seed_job(kube, "ppo-training")
    seed_deployment(kube, "optimizer")
    kube_name = f"kube-{uuid.uuid4().hex[:8]}"
    kube.save(kube_name)
    golden_key = f"models/{reg['model']}/v1/golden.npz"
    seen: dict = {}

    def approve_after_damage() -> None:
        deadline = time.monotonic() + 240
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
                runs = [r for r in client.read_flow_runs(flow_run_filter=paused)
                        if r.parameters.get("model") == reg["model"]]
                if runs:
                    seen["jobs"] = kube.list_jobs()
                    corrupt(reg, golden_key)
                    resume_flow_run(runs[0].id, run_input={"approve": True, "approver": "alice", "comment": "ok"})
                    return
                time.sleep(0.3)

    approver = threading.Thread(target=approve_after_damage, daemon=True)
    approver.start()
    state, report = run(reg, version="v1", approval_policy="required", allowed_approvers=["alice"], drill=False,
                        kube_block=kube_name, training_job_selector="app=ppo-training", delete_training_jobs=True,
                        serving_deployments=["optimizer"], rollout_timeout_seconds=10,
                        approval_timeout_seconds=300, approval_poll_seconds=0.5)
    approver.join(timeout=5)

    assert seen["jobs"] == [{"name": "ppo-training", "labels": {"app": "ppo-training"}, "suspended": True,
                             "active": seen["jobs"][0]["active"], "finished": False}]
    assert state.name == "VerificationFailed", report.summary
    assert report.approvals and report.approvals[0].approver == "alice"
    assert kube.list_jobs() == []  # deleted only after the approval
    assert block.production_version(reg["model"])[0] == "v2" and report.promotion is None
    golden = next(c for c in report.checks if c.name == "golden.npz current object")
    assert not golden.passed and golden.stage == "repaired"
    annotations = kube.get_deployment("optimizer")["spec"]["template"]["metadata"].get("annotations") or {}
    assert "kubectl.kubernetes.io/restartedAt" not in annotations


def test_a_retried_flip_records_the_version_read_before(registry):
    reg, block = registry, registry["block"]
    first = block.flip_pointer(reg["model"], "v1", expected_previous="v2")
    retried = block.flip_pointer(reg["model"], "v1", expected_previous="v2")
    assert (first.previous, first.already) == ("v2", False)
    assert (retried.previous, retried.current, retried.already) == ("v2", "v1", True)
