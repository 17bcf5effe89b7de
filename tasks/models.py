"""Tasks over a ModelRegistry: thin, verb-first wrappers of the block's verbs."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.errors import InvalidInput
from blocks.models import Manifest, ModelRegistry, PointerFlip, RestoredModel
from blocks.results import CheckResult
from tasks._policy import policy


@task(name="read-model-manifest", **policy(timeout_seconds=120))
def read_model_manifest(registry: ModelRegistry, model: str, version: str) -> Manifest:
    """The manifest of ``model``/``version``; refuses an empty prefix or an unknown version."""
    versions = registry.list_versions(model)
    if not versions:
        raise InvalidInput(f"no version of model {model!r} under s3://{registry.bucket_name}/"
                           f"{registry.describe()['prefix']}/{model}/")
    if version not in versions:
        raise InvalidInput(f"model {model!r} has no version {version!r}; known versions: {', '.join(versions)}")
    return registry.read_manifest(model, version)


@task(name="read-production-pointer", **policy(timeout_seconds=60))
def read_production_pointer(registry: ModelRegistry, model: str) -> str | None:
    """The version production serves now (None when the pointer is unset)."""
    return registry.production_version(model)[0]


@task(name="restore-model-version", **policy(timeout_seconds=3600))
def restore_model_version(registry: ModelRegistry, model: str, version: str, directory: str | None = None) -> RestoredModel:
    """Download and sha256-verify every artifact of a version; the bucket is not changed."""
    restored = registry.restore_version(model, version, directory)
    get_run_logger().info("Restored %s/%s into %s (%d artifacts, %d damaged in the bucket)", model, version,
                          restored.directory, len(restored.artifacts), len(restored.damaged))
    return restored


@task(name="check-model-function", **policy(timeout_seconds=1800, retries=0))
def check_model_function(registry: ModelRegistry, restored: RestoredModel) -> list[CheckResult]:
    """Load the restored model and reproduce its golden outputs within the tolerance."""
    return registry.functional_check(restored)


@task(name="repair-model-objects", **policy(timeout_seconds=1800))
def repair_model_objects(registry: ModelRegistry, restored: RestoredModel) -> list[str]:
    """Make the verified object versions current again for the damaged artifacts."""
    return registry.repair_objects(restored)


@task(name="flip-production-pointer", **policy(timeout_seconds=60))
def flip_production_pointer(registry: ModelRegistry, model: str, version: str,
                            expected_previous: str | None) -> PointerFlip:
    """Point production at ``version`` with a compare-and-swap write; a no-op when it already does."""
    flip = registry.flip_pointer(model, version, expected_previous)
    get_run_logger().info("Production pointer of %s: %s -> %s%s", model, flip.previous, flip.current,
                          " (already set)" if flip.already else "")
    return flip


@task(name="verify-model-objects", **policy(timeout_seconds=1800))
def verify_model_objects(registry: ModelRegistry, model: str, version: str) -> list[CheckResult]:
    """Check the current objects of a version in the bucket against its manifest."""
    return registry.verify_current(model, version)
