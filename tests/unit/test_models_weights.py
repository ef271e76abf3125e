"""Weights on disk: save/load round trip, missing and corrupt files, the CLI, pickle safety."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from raypdm import models
from raypdm.models import registry
from raypdm.models.cli import models_cli
from raypdm.models.registry import WeightFile
from raypdm.models.stable_diffusion import SD21_UNET_TINY, load_diffusers_model
from raypdm.models.weights import read_safetensors_header, read_state_dict, sha256_file

SD, X4 = "sd21-base", "sd-x4-upscaler"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A weights dir holding tiny bundles of both models in the hub layout, and the bundles."""
    root = tmp_path_factory.mktemp("weights")
    bundles = {name: models.build(name) for name in (SD, X4)}
    for name, bundle in bundles.items():
        bundle.save_pretrained(root / name)
    return root, bundles


@pytest.fixture
def copy_of(saved, tmp_path):
    root, _ = saved
    shutil.copytree(root / SD, tmp_path / SD)
    return tmp_path


def _statuses(weights_dir, name=SD):
    return {Path(s.path).relative_to(Path(weights_dir, name).absolute()).as_posix(): s
            for s in models.check_weights(weights_dir, [name])}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", [SD, X4])
def test_save_then_load_round_trip(saved, name, no_network):
    root, bundles = saved
    for f in models.get(name).files:  # the saved layout is the hub's, file for file
        assert (root / name / f.path).exists(), f.path
    loaded = models.load(name, root)
    built = bundles[name]
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, part), getattr(built, part)), part
    prompt = "a photo of sks person"
    assert loaded.tokenizer(prompt).input_ids == built.tokenizer(prompt).input_ids
    assert type(loaded.scheduler) is type(built.scheduler)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(built.scheduler.config)


def test_load_device_and_dtype(saved):
    root, _ = saved
    sd = models.load(SD, root, dtype=torch.bfloat16)
    assert next(sd.unet.parameters()).dtype == torch.bfloat16
    assert not sd.unet.training


def test_check_weights_on_saved_bundle_says_present(saved):
    root, _ = saved
    statuses = models.check_weights(root, [SD, X4])
    assert len(statuses) == len(models.get(SD).files) + len(models.get(X4).files)
    assert all(s.status == "present" for s in statuses), [(s.path, s.detail) for s in statuses if s.status != "present"]
    unet = _statuses(root)["unet/diffusion_pytorch_model.safetensors"]
    # Pinned hash of the real file: a tiny bundle is not the hub file. Layout is checked against its config.
    assert "tensors match" in unet.detail and "not the full architecture" in unet.detail


def test_check_weights_on_empty_dir_lists_every_file_missing(tmp_path):
    statuses = models.check_weights(tmp_path)
    expected = sum(len(models.get(n).files) for n in models.list_models())
    assert len(statuses) == expected
    assert all(s.status == "missing" for s in statuses)
    sd = [s for s in statuses if s.model == SD]
    assert {Path(s.path) for s in sd} == {(tmp_path / SD / f.path).absolute() for f in models.get(SD).files}
    assert all(s.fetch == models.get(SD).fetch_command(tmp_path) for s in sd)


def test_cli_check_exit_codes_and_fetch_command(saved, tmp_path):
    runner = CliRunner()
    result = runner.invoke(models_cli, ["check", "--weights-dir", str(tmp_path), "--model", SD])
    assert result.exit_code == 1
    assert "missing" in result.output
    assert all(line in result.output for line in models.get(SD).fetch_command(tmp_path).splitlines())
    root, _ = saved
    ok = runner.invoke(models_cli, ["check", "--weights-dir", str(root), "--model", SD, "--model", X4])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(models_cli, ["check", "--weights-dir", str(root), "--model", "nope"])
    assert bad.exit_code == 2 and "sd21-base" in bad.output


def test_cli_list():
    result = CliRunner().invoke(models_cli, ["list"])
    assert result.exit_code == 0
    for name in (SD, X4):
        assert name in result.output
    assert "stabilityai/stable-diffusion-2-1-base@" in result.output


def test_load_missing_raises_with_file_and_command(tmp_path):
    with pytest.raises(MissingWeightsErrorType) as err:
        models.load(SD, tmp_path)
    msg = str(err.value)
    assert str((tmp_path / SD / "unet" / "diffusion_pytorch_model.safetensors").absolute()) in msg
    assert all(line in msg for line in models.get(SD).fetch_command(tmp_path).splitlines())
    assert f"raypdm models fetch --weights-dir {tmp_path} --model {SD}" in msg
    assert isinstance(err.value, FileNotFoundError)


MissingWeightsErrorType = models.MissingWeightsError


def test_truncated_and_garbage_safetensors_are_corrupt(copy_of):
    unet = copy_of / SD / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    vae = copy_of / SD / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    st = _statuses(copy_of)
    assert st["unet/diffusion_pytorch_model.safetensors"].status == "corrupt"
    assert "truncated" in st["unet/diffusion_pytorch_model.safetensors"].detail
    assert st["vae/diffusion_pytorch_model.safetensors"].status == "corrupt"
    assert st["text_encoder/model.safetensors"].status == "present"
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(unet)


def test_wrong_shape_and_bad_json_are_corrupt(copy_of):
    te = copy_of / SD / "text_encoder" / "model.safetensors"
    state = load_file(te)
    key = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1)
    save_file(state, te)
    (copy_of / SD / "scheduler" / "scheduler_config.json").write_text("{not json")
    st = _statuses(copy_of)
    bad = st["text_encoder/model.safetensors"]
    assert bad.status == "corrupt" and "1 shape mismatches" in bad.detail and "0 keys missing" in bad.detail
    assert st["scheduler/scheduler_config.json"].status == "corrupt"
    result = CliRunner().invoke(models_cli, ["check", "-w", str(copy_of), "-m", SD])
    assert result.exit_code == 1
    assert all(line in result.output for line in models.get(SD).fetch_command(copy_of).splitlines())


def test_hub_key_names_are_accepted(copy_of, saved):
    """Hub files keep `text_model.` and may use old VAE attention names; both must check and load."""
    te = copy_of / SD / "text_encoder" / "model.safetensors"
    save_file({"text_model." + k: v for k, v in load_file(te).items()}, te)
    vae = copy_of / SD / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

    def old_name(key: str) -> str:
        for new, legacy in renames.items():
            key = key.replace(new, legacy)
        return key

    old = {old_name(k): v for k, v in load_file(vae).items()}
    assert any(".query." in k for k in old)
    save_file(old, vae)
    assert all(s.status == "present" for s in _statuses(copy_of).values())
    loaded = models.load(SD, copy_of)
    _, bundles = saved
    assert _same_weights(loaded.text_encoder, bundles[SD].text_encoder)
    assert _same_weights(loaded.vae, bundles[SD].vae)


def test_sha256_pin_is_checked(saved, monkeypatch):
    root, _ = saved
    src = models.get(SD)
    pinned = "unet/config.json"
    good = sha256_file(root / SD / pinned)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for digest, want in ((good, "present"), ("0" * 64, "corrupt")):
        files = tuple(WeightFile(f.path, sha256=digest) if f.path == pinned else f for f in src.files)
        models.register(dataclasses.replace(src, files=files))
        status = _statuses(root)[pinned]
        assert status.status == want, status.detail
        assert ("sha256 ok" in status.detail) == (want == "present")
    st = _statuses(root)
    assert "sha256 not pinned" in st["scheduler/scheduler_config.json"].detail
    # The real files' pins cannot apply to a tiny bundle: they are skipped, not failed, and say so.
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):  # fmt: skip
        assert "pin skipped" in st[weights].detail


class _Payload:
    """Unpickling this runs `Path.touch(marker)`: proof that arbitrary code would execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_read_with_weights_only(copy_of, tmp_path, saved):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(evil)
    assert not marker.exists()

    # A plain pickle is an accepted fallback for a missing safetensors file...
    unet_dir = copy_of / SD / "unet"
    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    status = _statuses(copy_of)["unet/diffusion_pytorch_model.safetensors"]
    assert status.status == "present" and "pickle fallback" in status.detail
    _, bundles = saved
    assert _same_weights(models.load(SD, copy_of).unet, bundles[SD].unet)

    # ...but one that smuggles an object in is refused at load time, without running it.
    torch.save({**state, "x": _Payload(marker)}, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to unpickle"):
        models.load(SD, copy_of)
    assert not marker.exists()


def test_single_safetensors_file_loads_with_preset_config(saved, tmp_path):
    _, bundles = saved
    unet = bundles[SD].unet
    path = tmp_path / "finetuned_unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, path)
    loaded = load_diffusers_model(type(unet), path, "unused", SD21_UNET_TINY, "cpu", None)
    assert _same_weights(loaded, unet)


def test_saved_tokenizer_has_hub_files(saved):
    root, _ = saved
    tok_dir = root / SD / "tokenizer"
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert (tok_dir / "merges.txt").read_text().startswith("#version")


# --------------------------------------------------------------------------- load-time sha256 verification


@pytest.fixture
def pinned_copy(copy_of, monkeypatch, tmp_path):
    """A copy of the tiny SD bundle whose registry entry pins two of its small files, and a hash counter."""
    from raypdm.models import verify

    monkeypatch.setenv("RAYPDM_CACHE_DIR", str(tmp_path / "user-cache"))
    models.list_models()  # built-ins register lazily: into the real registry, before it is swapped for a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    src = models.get(SD)
    pins = {p: sha256_file(copy_of / SD / p) for p in ("unet/config.json", "tokenizer/merges.txt")}
    files = tuple(WeightFile(f.path, sha256=pins.get(f.path, f.sha256), layout=f.layout, required=f.required)
                  for f in src.files)  # fmt: skip
    models.register(dataclasses.replace(src, files=files))
    calls: list[str] = []
    real = verify.sha256_file

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(verify, "sha256_file", counting)
    return copy_of, calls


def test_load_verifies_pins_once_per_file_version(pinned_copy):
    root, calls = pinned_copy
    models.load(SD, root)
    # Every pinned file on disk is hashed once (the tiny weights too: their pins then turn out not to apply)...
    assert {"config.json", "merges.txt", "diffusion_pytorch_model.safetensors", "model.safetensors"} <= set(calls)
    assert (root / ".raypdm-sha256.json").is_file()  # beside the weights
    calls.clear()
    models.load(SD, root)
    assert calls == []  # ...and not again while size and mtime are unchanged
    merges = root / SD / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text())  # same bytes, new mtime: hashed again, still fine
    models.load(SD, root)
    assert calls == ["merges.txt"]


def test_load_refuses_a_file_that_does_not_match_its_pin(pinned_copy):
    root, _ = pinned_copy
    merges = root / SD / "tokenizer" / "merges.txt"
    expected = models.get(SD).files[[f.path for f in models.get(SD).files].index("tokenizer/merges.txt")].sha256
    merges.write_text(merges.read_text() + "x y\n")
    with pytest.raises(models.CorruptWeightsError) as err:
        models.load(SD, root)
    msg = str(err.value)
    assert str(merges.absolute()) in msg and expected in msg and sha256_file(merges) in msg
    assert f"raypdm models fetch --weights-dir {root} --model {SD}" in msg
    assert isinstance(err.value, ValueError)


def test_no_verify_loads_the_file_as_it_is_and_says_so(pinned_copy, monkeypatch, caplog):
    import logging

    from raypdm.models import verify

    root, calls = pinned_copy
    merges = root / SD / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text() + "x y\n")  # no longer the pinned bytes
    monkeypatch.setenv(verify.NO_VERIFY_ENV, "1")
    monkeypatch.setattr(verify, "_unverified", set())
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="raypdm.models.verify"):
        models.load(SD, root)
        models.load(SD, root)
    assert calls == []  # nothing hashed
    warned = [r.getMessage() for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warned) == 1 and SD in warned[0]  # once per model and process
    monkeypatch.setenv(verify.NO_VERIFY_ENV, "0")
    with pytest.raises(models.CorruptWeightsError):
        models.load(SD, root)


def test_no_verify_reaches_a_running_clusters_workers(monkeypatch):
    """Connecting to a cluster, the workers get RAYPDM_NO_VERIFY through ray.init's runtime env; inside a
    submitted job that already sets it, it is left out (Ray refuses the same env var key twice)."""
    import json

    from raypdm.runtime import _propagated_runtime_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAYPDM_NO_VERIFY", raising=False)
    assert _propagated_runtime_env(None) is None
    monkeypatch.setenv("RAYPDM_NO_VERIFY", "1")
    assert _propagated_runtime_env(None) == {"env_vars": {"RAYPDM_NO_VERIFY": "1"}}
    given = {"env_vars": {"A": "b"}, "working_dir": "."}
    assert _propagated_runtime_env(given) == {"env_vars": {"A": "b", "RAYPDM_NO_VERIFY": "1"}, "working_dir": "."}
    job = {"runtime_env": {"env_vars": {"RAYPDM_NO_VERIFY": "1", "HF_HUB_OFFLINE": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _propagated_runtime_env(None) is None


def test_hash_cache_falls_back_to_the_user_cache(pinned_copy, tmp_path):
    root, calls = pinned_copy
    (root / ".raypdm-sha256.json").mkdir()  # an unwritable spot (root ignores chmod): cannot be replaced
    models.load(SD, root)
    assert (tmp_path / "user-cache" / "sha256.json").is_file()
    calls.clear()
    models.load(SD, root)
    assert calls == []


def test_weight_errors_survive_the_trip_from_a_ray_actor(tmp_path):
    """Raised in an actor, pickled to the driver: the same class, message and fields (not Ray's
    "Failed to deserialize exception")."""
    import pickle

    from raypdm.models.lpips_trunks import MissingTrunkError
    from raypdm.models.weights import CorruptWeightsError, MissingWeightsError

    errors = [MissingTrunkError("alex", tmp_path), MissingWeightsError("codeformer", [tmp_path / "a.pth"], "curl a"),
              CorruptWeightsError("codeformer", tmp_path / "a.pth", "00", "ff", "curl a")]
    for err in errors:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
