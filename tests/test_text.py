"""CLIP prompt embeddings (nnunetv2_dsm.text) and nnUNetv2_dsm_embed_prompts, offline: the real open_clip text tower
is built once per session with seeded random weights; cache logic runs with a fake encoder (no model build)."""
import json
import os
import socket
import stat
import zlib

import pytest
import torch

from nnunetv2_dsm import text
from nnunetv2_dsm.cli.embed_prompts import main as embed_main
from nnunetv2_dsm.labels import CLASS_NAMES

RANDOM = text.resolve_weights(random_weights=True)
REAL_LOADER = text.load_text_encoder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network, nor a Hugging Face cache this machine may happen to have."""
    monkeypatch.delenv(text.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


@pytest.fixture(scope="session")
def random_encoder():
    text.clear_encoder_memo()
    return text.load_text_encoder(text.DEFAULT_MODEL, RANDOM)  # memoised: later random(0) calls reuse it


@pytest.fixture(scope="session")
def class_embeddings(random_encoder):
    return text.embed_prompts(CLASS_NAMES, random_weights=True)


class FakeEncoder:
    """Deterministic unit vectors per (weights, prompt); records what it was asked to embed."""

    def __init__(self, model_name, weights, log):
        self.model_name, self.weights, self.log = model_name, weights, log

    def encode(self, prompts):
        self.log.append(list(prompts))
        rows = [torch.randn(512, generator=torch.Generator().manual_seed(zlib.crc32(f"{self.weights.id}|{p}".encode())))
                for p in prompts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


@pytest.fixture
def fake(monkeypatch):
    log = []
    monkeypatch.setattr(text, "load_text_encoder", lambda model_name=text.DEFAULT_MODEL, weights=None:
                        FakeEncoder(model_name, weights, log))
    return log


def forbid_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the CLIP model must not be built on a cache hit")
    monkeypatch.setattr(text, "load_text_encoder", fail)


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A fake nnU-Net tree: $nnUNet_preprocessed/Dataset999_Test with dataset.json and a configuration folder."""
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    folder = tmp_path / "nnUNet_preprocessed" / "Dataset999_Test"
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"name": "Test"}))
    return folder


def test_prompt_for():
    assert text.PROMPT_TEMPLATE == "a computerized tomography of a {}"
    assert text.prompt_for("Liver Tumor") == "a computerized tomography of a Liver Tumor"
    assert text.prompt_for("  pancreas   tumor ") == "a computerized tomography of a pancreas tumor"
    assert text.prompt_for("a hepatic cyst") == "a computerized tomography of a hepatic cyst"
    assert text.prompt_for("an adrenal cyst") == "a computerized tomography of an adrenal cyst"
    assert text.prompt_for("a computerized tomography of a spleen") == "a computerized tomography of a spleen"
    assert text.prompt_for("liver", template=None) == "liver"


def test_resolve_weights(tmp_path, monkeypatch):
    assert text.resolve_weights().id == "hub:openai"
    f = tmp_path / "open_clip_pytorch_model.bin"
    f.write_bytes(b"12345")
    monkeypatch.setenv(text.WEIGHTS_ENV, str(f))
    w = text.resolve_weights()
    assert (w.kind, w.path, w.size, w.trained) == ("file", str(f), 5, True)
    assert text.resolve_weights(w.id) == w  # recorded ids round-trip
    assert text.resolve_weights(random_weights=True, seed=3).id == "random(3)"
    assert text.resolve_weights("random(3)") == text.resolve_weights(random_weights=True, seed=3)
    assert not RANDOM.trained and text.resolve_weights("hub:openai").kind == "hub"


def test_random_text_tower(random_encoder, class_embeddings):
    assert random_encoder.model.visual is None  # only the text side is kept
    e = class_embeddings
    assert e.shape == (45, 512) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(45), atol=1e-5)
    assert torch.cdist(e, e).add(torch.eye(45)).min() > 1e-3  # 45 distinct rows
    for i in (0, 5, 44):  # row i is CLASS_NAMES[i]
        single = text.embed_prompts([CLASS_NAMES[i]], random_weights=True)
        assert torch.allclose(single[0], e[i], atol=1e-5)
    picked = text.embed_prompts([CLASS_NAMES[44], CLASS_NAMES[0], CLASS_NAMES[5]], random_weights=True)
    assert torch.allclose(picked, e[[44, 0, 5]], atol=1e-5)  # rows follow the order given


def test_random_weights_are_deterministic(random_encoder, class_embeddings):
    text.clear_encoder_memo()
    rebuilt = text.load_text_encoder(text.DEFAULT_MODEL, RANDOM)
    assert rebuilt is not random_encoder
    for (k, a), b in zip(random_encoder.model.state_dict().items(), rebuilt.model.state_dict().values()):
        assert torch.equal(a, b), k
    names = [CLASS_NAMES[1], CLASS_NAMES[30]]
    assert torch.allclose(rebuilt.encode([text.prompt_for(n) for n in names]), class_embeddings[[1, 30]], atol=1e-6)


def test_local_weights_file(tmp_path, monkeypatch, random_encoder):
    import open_clip
    torch.manual_seed(123)
    full = open_clip.create_model(text.DEFAULT_MODEL).eval()  # a whole CLIP model, different from random(0)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(full.state_dict(), path)
    names = ["Liver", "pancreas tumor"]
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(text.DEFAULT_MODEL)([text.prompt_for(n) for n in names])
        expected = torch.nn.functional.normalize(full.encode_text(tokens), dim=-1)
    got = text.embed_prompts(names, clip_weights=path)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, text.embed_prompts(names, random_weights=True), atol=1e-3)
    monkeypatch.setenv(text.WEIGHTS_ENV, str(path))  # the environment variable picks the same file
    cache = tmp_path / "prompts.pt"
    assert torch.allclose(text.embed_prompts(names, cache_file=cache), expected, atol=1e-5)
    stored = torch.load(cache, weights_only=True)["entries"][text.DEFAULT_MODEL]
    assert list(stored) == [f"file:{path}"] and stored[f"file:{path}"][text.prompt_for("Liver")]["weights_size"] \
        == os.path.getsize(path)


def test_no_weights_no_cache(tmp_path, monkeypatch):
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": ""}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)

        def no_dns(*args, **kwargs):
            raise socket.gaierror(-2, "Name or service not known")
        monkeypatch.setattr(socket, "getaddrinfo", no_dns)
        with pytest.raises(text.TextEmbeddingError) as err:
            text.embed_prompts(["Liver"], cache_file=tmp_path / "prompts.pt")
        msg = str(err.value)
        assert "nnUNetv2_dsm_embed_prompts" in msg and "--clip-weights" in msg and text.WEIGHTS_ENV in msg
        assert "--random-weights" in msg and "no language meaning" in msg
    with pytest.raises(text.TextEmbeddingError, match="no such file"):
        text.embed_prompts(["Liver"], clip_weights=tmp_path / "missing.bin")
    assert not (tmp_path / "prompts.pt").exists()


def test_dataset_cache_hit_and_miss(dataset, monkeypatch, fake):
    emb, info = text.build_dataset_cache(dataset, random_weights=True)
    assert len(fake) == 1 and len(fake[0]) == 45 and not info["reused"] and not info["trained_weights"]
    path = dataset / "dsm_text_embeddings.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["names"] == list(CLASS_NAMES) and raw["weights"] == "random(0)" and raw["model"] == text.DEFAULT_MODEL
    assert raw["prompts"][5] == "a computerized tomography of a Liver" and raw["template"] == text.PROMPT_TEMPLATE
    assert {"torch_version", "open_clip_version", "created"} <= set(raw)
    assert list((dataset / "nnUNetPlans_3d_fullres").iterdir()) == []  # nothing inside a configuration folder
    with monkeypatch.context() as m:
        forbid_loading(m)
        again, info = text.build_dataset_cache(dataset, random_weights=True)
        assert info["reused"] and torch.equal(again, emb)
        loaded, info = text.load_class_embeddings(dataset)
        assert torch.equal(loaded, emb) and info["trained_weights"] is False and "UNTRAINED" in info["warning"]
    fake.clear()
    names = CLASS_NAMES[:-1] + ("Rectum Cancer",)  # a changed prompt list: only the new prompt is computed
    changed, info = text.build_dataset_cache(dataset, names=names, random_weights=True)
    assert not info["reused"] and fake == [["a computerized tomography of a Rectum Cancer"]]
    assert torch.equal(changed[:44], emb[:44]) and not torch.equal(changed[44], emb[44])
    with pytest.raises(text.TextEmbeddingError, match="stale.*CLASS_NAMES.*--force"):
        text.load_class_embeddings(dataset)
    fake.clear()
    text.build_dataset_cache(dataset, template="a CT scan of {}", random_weights=True)
    assert len(fake) == 1 and len(fake[0]) == 45
    fake.clear()
    other, _ = text.build_dataset_cache(dataset, random_weights=True, seed=1)  # another weights source
    assert len(fake) == 1 and len(fake[0]) == 45 and not torch.allclose(other, emb)
    fake.clear()
    text.build_dataset_cache(dataset, random_weights=True, seed=1, force=True)
    assert len(fake) == 1 and len(fake[0]) == 45
    with pytest.raises(ValueError, match="configuration folder"):
        text.build_dataset_cache(dataset / "nnUNetPlans_3d_fullres", random_weights=True)


def test_weights_change_without_weights_is_an_error(dataset, monkeypatch, fake):
    text.build_dataset_cache(dataset, random_weights=True)
    monkeypatch.setattr(text, "load_text_encoder", REAL_LOADER)  # hub weights asked for, none reachable
    with pytest.raises(text.TextEmbeddingError, match="weights random.0.*than asked for.*weights hub:openai") as err:
        text.build_dataset_cache(dataset)
    assert "--clip-weights" in str(err.value) and "nnUNetv2_dsm_embed_prompts" in str(err.value)
    assert torch.load(dataset / "dsm_text_embeddings.pt", weights_only=True)["weights"] == "random(0)"


def test_atomic_write(dataset, monkeypatch, fake):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            text.build_dataset_cache(dataset, random_weights=True)
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "nnUNetPlans_3d_fullres"]
    emb, _ = text.build_dataset_cache(dataset, random_weights=True)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", broken_save)
        with pytest.raises(OSError):
            text.build_dataset_cache(dataset, random_weights=True, force=True)
    assert sorted(p.name for p in dataset.iterdir()) == [
        "dataset.json", "dsm_prompt_embeddings.pt", "dsm_text_embeddings.pt", "nnUNetPlans_3d_fullres"]
    assert torch.equal(text.load_class_embeddings(dataset)[0], emb)  # the old file is intact


def test_prompt_cache(tmp_path, monkeypatch, fake):
    cache = tmp_path / "model" / "dsm_prompt_embeddings.pt"
    prompts = ["pancreas tumor", "a hepatic cyst", "pancreas tumor"]
    first = text.embed_prompts(prompts, random_weights=True, cache_file=cache)
    assert fake == [["a computerized tomography of a pancreas tumor", "a computerized tomography of a hepatic cyst"]]
    assert torch.equal(first[0], first[2])
    with monkeypatch.context() as m:
        forbid_loading(m)
        assert torch.equal(text.embed_prompts(prompts, random_weights=True, cache_file=cache), first)
        extra = tmp_path / "other.pt"  # several caches: all are read
        assert torch.equal(text.embed_prompts(["a hepatic cyst"], random_weights=True, cache_file=[extra, cache]),
                           first[1:2])
    fake.clear()
    text.embed_prompts(["pancreas tumor"], random_weights=True, seed=5, cache_file=cache)  # other weights: a miss
    text.embed_prompts(["pancreas tumor"], random_weights=True, model_name="ViT-B-16", cache_file=cache)
    assert len(fake) == 2
    cache.write_bytes(b"garbage")  # an unreadable cache is a miss and gets rewritten
    text.embed_prompts(["pancreas tumor"], random_weights=True, cache_file=cache)
    assert len(fake) == 3 and torch.load(cache, weights_only=True)["format"] == text.PROMPT_CACHE_FORMAT


def test_load_class_embeddings_missing(dataset):
    with pytest.raises(text.TextEmbeddingError) as err:
        text.load_class_embeddings(dataset)
    assert str(dataset / "dsm_text_embeddings.pt") in str(err.value)
    assert "nnUNetv2_dsm_embed_prompts -d Dataset999_Test" in str(err.value)


def test_cli_end_to_end(dataset, monkeypatch, capsys, class_embeddings):
    embed_main(["-d", "999", "--random-weights", "--extra-prompts", "hepatic cyst", "a pancreatic cyst"])
    out = capsys.readouterr()
    assert "Dataset999_Test" in out.out and "random(0)" in out.out and "45 x 512" in out.out
    assert "written" in out.out and "UNTRAINED" in out.err
    emb, info = text.load_class_embeddings(dataset)
    assert torch.allclose(emb, class_embeddings, atol=1e-5) and info["trained_weights"] is False
    assert list((dataset / "nnUNetPlans_3d_fullres").iterdir()) == []
    umask = os.umask(0)
    os.umask(umask)
    for name in ("dsm_text_embeddings.pt", "dsm_prompt_embeddings.pt"):  # readable like any file the user writes
        assert stat.S_IMODE((dataset / name).stat().st_mode) == 0o666 & ~umask
    forbid_loading(monkeypatch)  # everything below comes from the caches
    embed_main(["-d", "Dataset999_Test", "--random-weights", "--extra-prompts", "hepatic cyst"])
    assert "up to date, reused" in capsys.readouterr().out
    got = text.embed_prompts(["a pancreatic cyst", "Liver"], random_weights=True,
                             cache_file=text.prompt_cache_path(dataset))
    assert torch.allclose(got[1], class_embeddings[5], atol=1e-6) and got.shape == (2, 512)


def test_cli_errors(dataset, monkeypatch, capsys, tmp_path):
    assert embed_main(["-d", "998", "--random-weights"]) == 2        # exit 2: bad input (errors.py)
    assert "unknown dataset" in capsys.readouterr().err
    (tmp_path / "nnUNet_raw" / "Dataset997_Raw").mkdir()
    assert embed_main(["-d", "997", "--random-weights"]) == 2
    assert "nnUNetv2_plan_and_preprocess -d 997" in capsys.readouterr().err
    assert embed_main(["-d", "999"]) == 2  # offline, no weights, no cache
    err = capsys.readouterr().err
    assert "nnUNetv2_dsm_embed_prompts -d 999" in err and "--clip-weights" in err
    assert not (dataset / "dsm_text_embeddings.pt").exists()


def test_console_script_registered():
    from importlib.metadata import entry_points
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["nnUNetv2_dsm_embed_prompts"] == "nnunetv2_dsm.cli.embed_prompts:main"
