"""Object stores checked before a job starts: the input can be listed, the output's bucket exists and takes a
write. A bad credential, a missing bucket or an unreachable endpoint is one clear line before Ray starts,
not a traceback from inside a Ray task minutes later.

    check_stores({"input": "s3://photos/celeba"}, "s3://results/run1")

Local paths are not checked here (the stages say what is missing in their own words). Buckets are never
created: fsspec back-ends create a missing bucket on `makedirs`, so a mistyped output bucket would otherwise
become a new, empty bucket quietly filled with results.

Credentials come from where the back-end looks for them (for s3fs: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL, the instance's IAM role), or
from a `--storage-options` file: back-end keyword arguments per protocol, handed to fsspec's own
configuration (`fsspec.config.conf`, and the `FSSPEC_<PROTOCOL>` variables its workers read at import).
No message here ever repeats a key or a secret.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from raypdm.data.uri import fs_and_path, join, protocol_of

__all__ = ["StoreError", "apply_storage_options", "check_stores", "is_remote", "load_storage_options"]

PROBE_PREFIX = ".raypdm.probe-"

_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the cluster's IAM role",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS, the cluster's service account",
    "abfs": "AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY, the cluster's managed identity",
}


class StoreError(Exception):
    """An object store the job needs cannot be used as it is (the message is one line for the user)."""


def is_remote(uri: str) -> bool:
    fs, _ = fs_and_path(uri)
    return not isinstance(fs, LocalFileSystem) and protocol_of(fs) not in ("memory",)


def _family(proto: str) -> str:
    return {"s3a": "s3", "gs": "gcs", "az": "abfs", "abfss": "abfs"}.get(proto, proto)


def _explain(exc: BaseException, uri: str, doing: str) -> StoreError:
    fs, _ = fs_and_path(uri)
    family = _family(protocol_of(fs))
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PermissionError):
        where = _CREDENTIALS.get(family, "the back-end's credentials")
        return StoreError(f"cannot {doing} {uri}: access denied ({detail}); check the credentials: {where}, "
                          f"or the keys of --storage-options")
    if isinstance(exc, FileNotFoundError):
        return StoreError(f"cannot {doing} {uri}: not found ({detail})")
    return StoreError(f"cannot {doing} {uri}: {type(exc).__name__}: {detail}")


def _bucket(uri: str) -> tuple[object, str]:
    fs, path = fs_and_path(uri)
    return fs, path.strip("/").split("/", 1)[0]


def _check_bucket(uri: str, role: str) -> None:
    fs, bucket = _bucket(uri)
    try:
        fs.invalidate_cache()
        info = fs.info(bucket)
    except FileNotFoundError:
        raise StoreError(f"the bucket {bucket!r} of the {role} {uri} does not exist (raypdm never creates "
                         f"buckets: create it, or fix the name)") from None
    except Exception as exc:  # noqa: BLE001 (credentials, endpoint: said in one line)
        raise _explain(exc, uri, f"reach the bucket {bucket!r} of the {role}") from None
    if info.get("type") not in (None, "directory"):
        raise StoreError(f"{bucket!r} of the {role} {uri} is not a bucket")


def _check_input(name: str, uri: str) -> None:
    _check_bucket(uri, name)
    fs, path = fs_and_path(uri)
    try:
        fs.ls(path.rstrip("/"), detail=False)
    except FileNotFoundError:
        if not fs.isfile(path):  # a single input file (a config, a checkpoint) is fine
            raise StoreError(f"the {name} {uri} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, uri, f"list the {name}") from None


def _check_output(uri: str) -> None:
    _check_bucket(uri, "output")
    fs, path = fs_and_path(uri)
    probe = join(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    _, probe_path = fs_and_path(probe)
    try:
        fs.pipe_file(probe_path, b"raypdm write probe\n")
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, uri, "write into the output") from None
    try:
        fs.rm(probe_path)
    except Exception as exc:  # noqa: BLE001 (a store that takes writes but refuses deletes: outputs are replaced)
        raise _explain(exc, uri, "delete from the output (replacing outputs and the lock need it)") from None


def check_stores(inputs: dict[str, str | None], output: str | None) -> None:
    """Raise StoreError, in one line, when a remote input cannot be listed or a remote output bucket is
    missing or refuses a write (a probe object, removed at once). Local paths are left to the stages."""
    for name, uri in inputs.items():
        if uri and is_remote(str(uri)):
            _check_input(name, str(uri))
    if output and is_remote(str(output)):
        _check_output(str(output))


# Protocols a storage-options file may configure, with the fsspec protocol names they set.
_PROTOCOLS = {"s3": ("s3", "s3a"), "gcs": ("gcs", "gs"), "gs": ("gcs", "gs"), "abfs": ("abfs", "az"),
              "az": ("abfs", "az"), "http": ("http", "https"), "https": ("http", "https")}


def load_storage_options(path: str) -> dict[str, dict[str, Any]]:
    """Read a storage-options file (YAML or JSON): `{protocol: {keyword: value}}`, e.g.

        s3:
          endpoint_url: https://minio.internal:9000
          key: ...
          secret: ...

    Raises StoreError naming the file and the field (never a value: they may be secrets)."""
    import yaml

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise StoreError(f"--storage-options {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise StoreError(f"--storage-options {path}: not valid YAML{where}") from None
    if not isinstance(data, dict) or not data:
        raise StoreError(f"--storage-options {path}: expected a mapping of protocol -> options, e.g. 's3: {{key: ...}}'")
    out: dict[str, dict[str, Any]] = {}
    for proto, options in data.items():
        if proto not in _PROTOCOLS:
            raise StoreError(f"--storage-options {path}: unknown protocol {proto!r}; one of {sorted(_PROTOCOLS)}")
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise StoreError(f"--storage-options {path}: {proto} must be a mapping of keyword -> value")
        out[str(proto)] = dict(options)
    return out


def apply_storage_options(options: dict[str, dict[str, Any]]) -> None:
    """Make `options` the defaults of every file system fsspec creates from now on, in this process and in
    the Ray workers it starts (they inherit FSSPEC_<PROTOCOL>, which fsspec reads at import). A running
    cluster's workers do not inherit it: there, give the nodes a role (README, Object stores)."""
    import fsspec.config

    for proto, kwargs in options.items():
        for name in _PROTOCOLS[proto]:
            merged = fsspec.config.conf.setdefault(name, {})
            merged.update(kwargs)
            os.environ[f"FSSPEC_{name.upper()}"] = json.dumps(merged, default=str)
    _clear_instances()


def _clear_instances() -> None:
    """fsspec caches file-system instances by their arguments: drop them so new defaults apply."""
    import fsspec

    for cls in fsspec.registry.values() if hasattr(fsspec.registry, "values") else []:
        try:
            cls.clear_instance_cache()
        except Exception:  # noqa: BLE001
            pass
