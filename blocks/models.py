"""A model registry kept in a versioned backup bucket, and the verbs a model recovery needs.

Layout under the registry's prefix::

    <prefix>/<model>/<version>/manifest.json     sha256 and size of every artifact, golden check spec
    <prefix>/<model>/<version>/<artifact>        weights, tokenizer, golden inputs/outputs, ...
    <prefix>/<model>/PRODUCTION                  the version serving reads (text)

The bucket has versioning on: an artifact overwritten with bad bytes still has its good
object versions, and a restore picks the newest object version whose sha256 matches the
manifest. The production pointer is flipped with a conditional write (compare-and-swap on
its ETag), so two recoveries cannot both believe they set it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from prefect.blocks.core import Block
from prefect_aws.s3 import S3Bucket
from pydantic import BaseModel, Field, ValidationError

from blocks._aws import client, error_code, translate
from blocks.errors import InvalidInput, RecoveryError
from blocks.results import CheckResult

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
POINTER = "PRODUCTION"
MANIFEST = "manifest.json"
CHUNK = 1024 * 1024
COPY_PART_BYTES = 256 * 1024 * 1024  # objects above this are copied in parts of this size


class ModelRegistryError(RecoveryError):
    """The model registry's bucket refused or failed an operation."""


class ModelRegistryUnavailable(ModelRegistryError):
    """The bucket could not be reached; may succeed on a retry."""

    transient = True


class Artifact(BaseModel):
    """One file of a model version, as the manifest records it."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes, hex.")
    size: int = Field(ge=0, description="Size in bytes.")


class GoldenCheck(BaseModel):
    """Golden inputs and the outputs the model must reproduce within a tolerance."""

    file: str = Field(default="golden.npz", description="Artifact holding arrays 'inputs' and 'outputs'.")
    tolerance: float = Field(default=1e-5, ge=0, description="Largest absolute difference accepted per output.")


class Manifest(BaseModel):
    """What a model version is made of."""

    model: str = Field(description="Model name.")
    version: str = Field(description="Version name.")
    created_at: datetime | None = Field(default=None, description="When the version was published.")
    artifacts: dict[str, Artifact] = Field(description="Artifacts by file name.")
    golden: GoldenCheck | None = Field(default=None, description="The functional check of this version.")
    entrypoint: str = Field(default="weights.npz", description="Artifact the loader opens.")


@dataclass(frozen=True)
class RestoredArtifact:
    """Which stored object version of an artifact was restored, and whether the current one was sound."""

    file: str
    key: str
    version_id: str | None
    sha256: str
    size: int
    current_ok: bool
    versions_examined: int


@dataclass(frozen=True)
class RestoredModel:
    """A model version downloaded and sha256-verified into a local directory."""

    model: str
    version: str
    directory: str
    artifacts: list[RestoredArtifact] = field(default_factory=list)

    @property
    def damaged(self) -> list[RestoredArtifact]:
        """Artifacts whose current object in the bucket does not match the manifest."""
        return [a for a in self.artifacts if not a.current_ok]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PointerFlip:
    """The production pointer before and after a flip."""

    model: str
    key: str
    previous: str | None
    current: str
    already: bool
    version_id: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise InvalidInput(f"{kind} {value!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_numpy_mlp(directory: Path, manifest: Manifest) -> Callable[[np.ndarray], np.ndarray]:
    """Load a multilayer perceptron saved as ``.npz`` with arrays W0, b0, W1, b1, ... (ReLU between layers)."""
    with np.load(directory / manifest.entrypoint, allow_pickle=False) as data:
        layers = []
        while f"W{len(layers)}" in data:
            i = len(layers)
            layers.append((np.array(data[f"W{i}"]), np.array(data[f"b{i}"])))
    if not layers:
        raise ValueError(f"{manifest.entrypoint} holds no layer W0/b0")

    def predict(inputs: np.ndarray) -> np.ndarray:
        out = np.asarray(inputs, dtype=np.float64)
        for i, (weights, bias) in enumerate(layers):
            out = out @ weights + bias
            if i < len(layers) - 1:
                out = np.maximum(out, 0)
        return out

    return predict


class ModelRegistry(Block):
    """Model versions in a versioned backup bucket, with a production pointer per model.

    Example:
        ```python
        from blocks.models import ModelRegistry
        registry = ModelRegistry.load("ml-backups")
        registry.list_versions("ranker")          # ['v1', 'v2']
        restored = registry.restore_version("ranker", "v1")
        registry.functional_check(restored)
        registry.flip_pointer("ranker", "v1")
        ```
    """

    _block_type_name = "Model Registry"
    _block_type_slug = "model-registry"
    _logo_url = "https://numpy.org/images/logo.svg"
    _description = "Model artifacts with sha256 manifests in a versioned bucket, and a production pointer per model."

    bucket: S3Bucket = Field(description="The backup bucket (versioning on), with its credentials.")
    prefix: str = Field(default="models", description="Key prefix under which every model lives.")
    loader: str = Field(
        default="blocks.models:load_numpy_mlp",
        description="'module:function' that turns (directory, manifest) into a predict(inputs) callable.",
    )
    restore_directory: str = Field(
        default="/var/lib/dr-pipelines/models", description="Local directory where versions are restored."
    )
    environment: Literal["production", "staging", "sandbox"] = Field(
        default="production", description="Drills may approve themselves ('auto' policy) only outside production."
    )

    # ------------------------------------------------------------------ plumbing

    def _s3(self):
        return client(self.bucket.credentials, "s3")

    @property
    def bucket_name(self) -> str:
        return self.bucket.bucket_name

    def _key(self, model: str, *parts: str) -> str:
        base = "/".join(p.strip("/") for p in (self.bucket.bucket_folder, self.prefix) if p and p.strip("/"))
        return "/".join([base, model, *parts]) if base else "/".join([model, *parts])

    def pointer_key(self, model: str) -> str:
        return self._key(check_name("model", model), POINTER)

    def _aws(self, what: str, fn, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket_name, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, what) from exc

    def _error(self, exc: Exception, what: str) -> ModelRegistryError:
        return translate(exc, f"{what} in bucket {self.bucket_name}", error=ModelRegistryError,
                         unavailable=ModelRegistryUnavailable)

    def _read_object(self, key: str) -> tuple[bytes, str] | None:
        """The bytes and ETag of ``key``; None when the key does not exist. Other failures raise."""
        from botocore.exceptions import BotoCoreError

        try:
            obj = self._aws(f"read {key}", self._s3().get_object, Key=key)
        except ModelRegistryError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return obj["Body"].read(), obj["ETag"]
        except BotoCoreError as exc:
            raise self._error(exc, f"read {key}") from exc

    # ------------------------------------------------------------------ reading

    def list_versions(self, model: str) -> list[str]:
        """Versions of ``model`` that have a manifest, sorted by name."""
        check_name("model", model)
        s3 = self._s3()
        prefix = self._key(model) + "/"
        versions, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._aws(f"list versions of {model}", s3.list_objects_v2, Prefix=prefix, **extra)
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(prefix):]
                if rest.count("/") == 1 and rest.endswith("/" + MANIFEST):
                    versions.append(rest.split("/")[0])
            if not page.get("IsTruncated"):
                return sorted(versions)
            token = page["NextContinuationToken"]

    def read_manifest(self, model: str, version: str) -> Manifest:
        """The manifest of one version; refuses a version that has none or an unreadable one."""
        check_name("model", model)
        check_name("version", version)
        key = self._key(model, version, MANIFEST)
        found = self._read_object(key)
        if found is None:
            known = ", ".join(self.list_versions(model)) or "none"
            raise InvalidInput(f"model {model!r} has no version {version!r} (no {key}); known versions: {known}")
        body = found[0]
        try:
            manifest = Manifest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput(f"manifest {key} is not a valid manifest: {exc.errors()[0]['msg']}") from exc
        if manifest.model != model or manifest.version != version:
            raise InvalidInput(f"manifest {key} describes {manifest.model}/{manifest.version}, not {model}/{version}")
        for name in manifest.artifacts:
            check_name("artifact", name)
        if manifest.entrypoint not in manifest.artifacts:
            raise InvalidInput(f"manifest {key}: entrypoint {manifest.entrypoint!r} is not among its artifacts")
        if manifest.golden and manifest.golden.file not in manifest.artifacts:
            raise InvalidInput(f"manifest {key}: golden file {manifest.golden.file!r} is not among its artifacts")
        return manifest

    def production_version(self, model: str) -> tuple[str | None, str | None]:
        """The version the production pointer names and the pointer's ETag (None, None when unset)."""
        key = self.pointer_key(model)
        found = self._read_object(key)
        if found is None:
            return None, None
        body, etag = found
        return body.decode().strip() or None, etag

    # ------------------------------------------------------------------ restore and verify

    def _object_versions(self, key: str) -> list[dict]:
        """Stored object versions of ``key``, the current one first, then newest to oldest."""
        s3 = self._s3()
        found, marker, vmarker = [], None, None
        while True:
            extra = {"KeyMarker": marker, "VersionIdMarker": vmarker} if marker else {}
            page = self._aws(f"list object versions of {key}", s3.list_object_versions, Prefix=key, **extra)
            found += [v for v in page.get("Versions", []) if v["Key"] == key]
            if not page.get("IsTruncated"):
                break
            marker, vmarker = page.get("NextKeyMarker"), page.get("NextVersionIdMarker")
        return sorted(found, key=lambda v: (not v.get("IsLatest"), -v["LastModified"].timestamp()))

    def _download(self, key: str, version_id: str | None, path: Path) -> str:
        from botocore.exceptions import BotoCoreError

        s3 = self._s3()
        extra = {"VersionId": version_id} if version_id and version_id != "null" else {}
        obj = self._aws(f"download {key}", s3.get_object, Key=key, **extra)
        digest = hashlib.sha256()
        try:
            with open(path, "wb") as fh:
                for chunk in obj["Body"].iter_chunks(CHUNK):
                    digest.update(chunk)
                    fh.write(chunk)
        except BotoCoreError as exc:
            raise self._error(exc, f"download {key}") from exc
        return digest.hexdigest()

    def restore_version(self, model: str, version: str, directory: str | None = None) -> RestoredModel:
        """Download every artifact of a version, each from the newest object version matching the manifest.

        Nothing in the bucket changes. A file whose current object is damaged is taken from an
        older object version; when no stored version matches the manifest, the version is refused.

        Raises:
            InvalidInput: unknown version, or an artifact none of whose stored versions matches.
        """
        manifest = self.read_manifest(model, version)
        target = Path(directory or os.path.join(self.restore_directory, model, version))
        target.mkdir(parents=True, exist_ok=True)
        restored = []
        for name, want in sorted(manifest.artifacts.items()):
            key = self._key(model, version, name)
            versions = self._object_versions(key)
            if not versions:
                raise InvalidInput(f"artifact {key} of {model}/{version} is missing from the bucket")
            partial = target / f".{name}.part"
            chosen = None
            for examined, candidate in enumerate(versions, 1):
                if candidate["Size"] != want.size:
                    continue
                digest = self._download(key, candidate.get("VersionId"), partial)
                if digest == want.sha256:
                    chosen = (candidate, examined)
                    break
            if chosen is None:
                partial.unlink(missing_ok=True)
                raise InvalidInput(
                    f"artifact {key}: none of its {len(versions)} stored versions matches the manifest "
                    f"(sha256 {want.sha256[:12]}..., {want.size} bytes); version {version!r} cannot be restored"
                )
            os.replace(partial, target / name)
            candidate, examined = chosen
            restored.append(RestoredArtifact(
                file=name, key=key, version_id=candidate.get("VersionId"), sha256=want.sha256, size=want.size,
                current_ok=bool(candidate.get("IsLatest")), versions_examined=examined,
            ))
        (target / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        return RestoredModel(model=model, version=version, directory=str(target), artifacts=restored)

    def load_predictor(self, restored: RestoredModel) -> Callable[[np.ndarray], np.ndarray]:
        """The predict callable of a restored version, from the registry's loader."""
        module, _, name = self.loader.partition(":")
        try:
            loader = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise InvalidInput(f"model loader {self.loader!r} cannot be imported: {exc}") from exc
        manifest = Manifest.model_validate_json((Path(restored.directory) / MANIFEST).read_text())
        return loader(Path(restored.directory), manifest)

    def functional_check(self, restored: RestoredModel) -> list[CheckResult]:
        """Verify the restored files again, load the model and reproduce its golden outputs."""
        directory = Path(restored.directory)
        manifest = Manifest.model_validate_json((directory / MANIFEST).read_text())
        checks = []
        bad = [a.file for a in restored.artifacts if sha256_file(directory / a.file) != a.sha256]
        checks.append(CheckResult("artifacts match the manifest", not bad,
                                  f"{len(restored.artifacts) - len(bad)} of {len(restored.artifacts)} files match sha256"
                                  + (f"; mismatching: {', '.join(bad)}" if bad else "")))
        if bad:
            return checks
        if manifest.golden is None:
            checks.append(CheckResult("golden outputs", False, "the manifest defines no golden check"))
            return checks
        try:
            predict = self.load_predictor(restored)
        except InvalidInput:  # a misconfigured registry is not a verdict on the model
            raise
        except Exception as exc:  # any loader failure is the check's verdict on the model
            checks.append(CheckResult("model loads", False, f"{type(exc).__name__}: {exc}"[:300]))
            return checks
        checks.append(CheckResult("model loads", True, f"{manifest.entrypoint} via {self.loader}"))
        with np.load(directory / manifest.golden.file, allow_pickle=False) as golden:
            inputs, expected = np.array(golden["inputs"]), np.array(golden["outputs"])
        try:
            outputs = np.asarray(predict(inputs))
        except Exception as exc:  # a model that cannot run its golden inputs fails the check
            checks.append(CheckResult("golden outputs", False, f"{type(exc).__name__}: {exc}"[:300]))
            return checks
        if outputs.shape != expected.shape:
            checks.append(CheckResult("golden outputs", False, f"shape {outputs.shape}, expected {expected.shape}"))
            return checks
        error = float(np.max(np.abs(outputs - expected))) if expected.size else 0.0
        finite = bool(np.all(np.isfinite(outputs)))
        passed = finite and error <= manifest.golden.tolerance
        checks.append(CheckResult(
            "golden outputs", passed,
            f"{len(inputs)} golden inputs, max abs error {error:.3g} (tolerance {manifest.golden.tolerance:g})"
            + ("" if finite else "; non-finite outputs"),
        ))
        return checks

    # ------------------------------------------------------------------ changes

    def repair_objects(self, restored: RestoredModel) -> list[str]:
        """Make the verified object versions current again for damaged artifacts; returns the keys repaired.

        Idempotent and reversible: the bucket is versioned, the damaged bytes stay as an older version.
        """
        from boto3.s3.transfer import TransferConfig

        s3 = self._s3()
        repaired = []
        for artifact in restored.damaged:
            head = self._aws(f"read {artifact.key}", s3.head_object, Key=artifact.key)
            if head.get("VersionId") == artifact.version_id:
                continue
            source = {"Bucket": self.bucket_name, "Key": artifact.key, "VersionId": artifact.version_id}
            # A managed copy: one CopyObject up to the threshold, UploadPartCopy parts above it (CopyObject stops at 5 GiB).
            config = TransferConfig(multipart_threshold=COPY_PART_BYTES, multipart_chunksize=COPY_PART_BYTES)
            self._aws(f"restore {artifact.key}", s3.copy, Key=artifact.key, CopySource=source, Config=config)
            repaired.append(artifact.key)
        return repaired

    def verify_current(self, model: str, version: str) -> list[CheckResult]:
        """Check the current objects of a version against its manifest, without keeping the bytes."""
        from botocore.exceptions import BotoCoreError

        manifest = self.read_manifest(model, version)
        s3 = self._s3()
        checks = []
        for name, want in sorted(manifest.artifacts.items()):
            key = self._key(model, version, name)
            obj = self._aws(f"read {key}", s3.get_object, Key=key)
            digest = hashlib.sha256()
            try:
                for chunk in obj["Body"].iter_chunks(CHUNK):
                    digest.update(chunk)
            except BotoCoreError as exc:
                raise self._error(exc, f"read {key}") from exc
            checks.append(CheckResult(f"{name} current object", digest.hexdigest() == want.sha256,
                                      f"sha256 {digest.hexdigest()[:12]}..., manifest {want.sha256[:12]}..."))
        return checks

    def flip_pointer(self, model: str, version: str, expected_previous: str | None = None) -> PointerFlip:
        """Point production at ``version`` with a compare-and-swap write; idempotent.

        Args:
            model: model name.
            version: the version serving must read from now on.
            expected_previous: the version the caller read before deciding to flip (None: it was unset or is
                not known). The flip is refused if the pointer moved since; when a retry finds the pointer
                already at ``version``, this is the previous version recorded.
        """
        key = self.pointer_key(model)
        check_name("version", version)
        current, etag = self.production_version(model)
        if current == version:
            return PointerFlip(model, key, expected_previous, version, True, None)
        if expected_previous is not None and current != expected_previous:
            raise ModelRegistryError(
                f"production pointer {key} changed to {current!r} since it was read as {expected_previous!r}; "
                "another change is under way"
            )
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            put = self._aws(f"write {key}", self._s3().put_object, Key=key, Body=version.encode(),
                            ContentType="text/plain", **condition)
        except ModelRegistryError as exc:
            if error_code(exc) in ("PreconditionFailed", "412"):
                raise ModelRegistryError(f"production pointer {key} changed during the flip; nothing was written") from exc
            raise
        return PointerFlip(model, key, current, version, False, put.get("VersionId"))

    def publish_version(self, model: str, version: str, directory: str | Path,
                        golden: GoldenCheck | None = None, entrypoint: str = "weights.npz") -> Manifest:
        """Upload every file of ``directory`` as a version, with its manifest written last."""
        check_name("model", model)
        check_name("version", version)
        folder = Path(directory)
        artifacts = {}
        s3 = self._s3()
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
            check_name("artifact", path.name)
            artifacts[path.name] = Artifact(sha256=sha256_file(path), size=path.stat().st_size)
            with open(path, "rb") as fh:
                self._aws(f"upload {path.name}", s3.put_object, Key=self._key(model, version, path.name), Body=fh)
        manifest = Manifest(model=model, version=version, created_at=datetime.now(timezone.utc),
                            artifacts=artifacts, golden=golden, entrypoint=entrypoint)
        self._aws("upload manifest", s3.put_object, Key=self._key(model, version, MANIFEST),
                  Body=manifest.model_dump_json(indent=2).encode(), ContentType="application/json")
        return manifest

    def describe(self) -> dict[str, Any]:
        """Where the registry is, for evidence (no credentials)."""
        return {"bucket": self.bucket_name, "prefix": self._key("").rstrip("/"), "loader": self.loader}

