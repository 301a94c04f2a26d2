"""Model merging on tiny models (CPU): the arithmetic, the key rules, the errors, and a merged
model that trains and exports."""
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dbnb.core.config import Config
from dbnb.family.sd1.layout import ORIGINAL_PREFIXES, write_single_file
from dbnb.family.sd1.load import UnsafeCheckpointError, load_checkpoint_file, load_pipeline
from dbnb.family.sd1.singlefile import weight_files
from dbnb.ship.export import export
from dbnb.ship.hashes import short_hash
from dbnb.ship.merge import MergeError, file_stem, merge, recipe
from dbnb.train.loop import train
from dbnb.world.demo import write_dataset
from dbnb.world.tiny import make_tiny_model

UNET, VAE, TE = ORIGINAL_PREFIXES["unet"], ORIGINAL_PREFIXES["vae"], ORIGINAL_PREFIXES["text_encoder"]
POSITION_IDS = TE + "embeddings.position_ids"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three distinct tiny models, each as an original-layout file and a diffusers folder."""
    root = tmp_path_factory.mktemp("merge-inputs")
    files, folders = [], []
    for seed in range(3):
        folders.append(make_tiny_model(root / f"m{seed}", single_file=root / f"m{seed}.safetensors", seed=seed))
        files.append(root / f"m{seed}.safetensors")
    return files, folders


def run(inputs, tmp_path, **kw):
    kw.setdefault("out_file", tmp_path / "merged.safetensors")
    kw.setdefault("dtype", "fp32")
    return merge([str(i) for i in inputs], progress=False, **kw)


def assert_matches(got, want, exact=False):
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        if exact:
            assert torch.equal(got[k], v), k
        else:
            torch.testing.assert_close(got[k], v, msg=k)


# --- the arithmetic ------------------------------------------------------------------------------

def test_weighted_sum_of_three_equals_the_state_dict_arithmetic(tiny, tmp_path, monkeypatch):
    files, _ = tiny
    monkeypatch.setattr("dbnb.family.sd1.singlefile.REOPEN_BYTES", 100_000)  # reopen the inputs every few tensors
    result = run(files, tmp_path, weights=[5, 2.7, 2])
    sds = [load_file(f) for f in files]
    w = [5 / 9.7, 2.7 / 9.7, 2 / 9.7]  # normalised
    want = {k: sum(wi * sd[k] for wi, sd in zip(w, sds)) for k in sds[0]}
    assert_matches(load_file(result.file), want)
    assert result.recipe == "m0 5, m1 2.7, m2 2"


def test_weights_as_given_when_not_normalised(tiny, tmp_path):
    files, _ = tiny
    result = run(files[:2], tmp_path, weights=[0.9, 0.3], normalize=False, dtype="fp16")
    a, b = (load_file(f) for f in files[:2])
    want = {k: (0.9 * a[k] + 0.3 * b[k]).half() for k in a}
    assert_matches(load_file(result.file), want)
    assert "not normalised" in result.recipe


def test_add_difference_equals_the_state_dict_arithmetic(tiny, tmp_path):
    files, _ = tiny
    result = run(files, tmp_path, mode="add_difference", alpha=0.4, dtype="fp16",
                 labels=["Any", "NAI nsfw", "NAI sfw"])
    a, b, c = (load_file(f) for f in files)
    assert_matches(load_file(result.file), {k: (a[k] + (b[k] - c[k]) * 0.4).half() for k in a}, exact=True)
    assert result.recipe == "Any + (NAI nsfw − NAI sfw) × 0.4"
    with safe_open(result.file, "pt") as f:
        assert f.metadata()["dbnb_merge_recipe"] == "Any + (NAI nsfw − NAI sfw) × 0.4"


def test_a_diffusers_folder_input_merges_as_its_single_file(tiny, tmp_path):
    files, folders = tiny
    from_file = run([files[0], files[1]], tmp_path / "a", weights=[0.3, 0.7])
    from_folder = run([folders[0], folders[1]], tmp_path / "b", weights=[0.3, 0.7], out_file=tmp_path / "b.ckpt")
    assert_matches(load_checkpoint_file(from_folder.file), load_file(from_file.file), exact=True)


def test_unet_only_and_skipping_the_vae_copy_those_parts_from_the_primary(tiny, tmp_path):
    files, _ = tiny
    a, b = (load_file(f) for f in files[:2])
    only_unet = load_file(run(files[:2], tmp_path / "u", unet_only=True).file)
    no_vae = load_file(run(files[:2], tmp_path / "v", include_vae=False, dtype="fp16").file)
    for k in a:
        mixed = 0.5 * a[k] + 0.5 * b[k]
        torch.testing.assert_close(only_unet[k], mixed if k.startswith(UNET) else a[k])
        torch.testing.assert_close(no_vae[k], (a[k] if k.startswith(VAE) else mixed).half())
    assert not torch.equal(only_unet[UNET + "out.2.weight"], a[UNET + "out.2.weight"])


# --- inputs from real-world files ----------------------------------------------------------------

def webui_style(src, dst, *, float_position_ids=True):
    """A tiny model with what real SD 1.x files carry: EMA copies, position_ids, the old
    text-encoder prefix and ldm's schedule buffers."""
    sd = load_file(src)
    out = {k.replace(TE, "cond_stage_model.transformer."): v for k, v in sd.items()}
    for k in [k for k in sd if k.startswith(UNET)][:5]:  # ldm names EMA keys without the dots
        out["model_ema." + k.removeprefix("model.").replace(".", "")] = sd[k] + 1
    out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    ids = torch.arange(77)[None]
    out["cond_stage_model.transformer.embeddings.position_ids"] = ids - 0.0001 if float_position_ids else ids
    out["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000, dtype=torch.float32)
    out["betas"] = torch.linspace(0.00085, 0.012, 1000, dtype=torch.float32)
    write_single_file(dst, out)
    return dst


def test_a_key_under_both_text_encoder_prefixes_is_refused_naming_both(tiny, tmp_path):
    """A file a tool saved half-converted: one weight under the old prefix and the new. Its header
    lists the old one first (sorted), so the new one is the key that meets its renamed twin."""
    files, _ = tiny
    both = webui_style(files[0], tmp_path / "both.safetensors")
    sd = load_file(both)
    old = next(k for k in sd if k.startswith("cond_stage_model.transformer.") and "position_ids" not in k)
    sd[TE + old.removeprefix("cond_stage_model.transformer.")] = sd[old].clone()
    write_single_file(both, sd)
    with pytest.raises(MergeError, match=r"both under cond_stage_model\.transformer\.\* and under "
                                         r"cond_stage_model\.transformer\.text_model\.\*"):
        run([both, files[1]], tmp_path)


def test_mismatched_key_sets_follow_the_stated_rules(tiny, tmp_path, capsys):
    files, folders = tiny
    primary = webui_style(files[0], tmp_path / "old.safetensors")
    result = run([primary, folders[1], webui_style(files[2], tmp_path / "old2.ckpt", float_position_ids=False)],
                 tmp_path, weights=[1, 1, 2], dtype="fp16")
    got = load_file(result.file)
    sds = [load_file(f) for f in files]
    want = {k: (0.25 * sds[0][k] + 0.25 * sds[1][k] + 0.5 * sds[2][k]).half() for k in sds[0]}
    assert not any(k.startswith("model_ema.") for k in got)
    assert torch.equal(got[POSITION_IDS], torch.arange(77)[None])  # repaired, int64
    assert torch.equal(got["alphas_cumprod"], load_file(primary)["alphas_cumprod"])  # fp32, unchanged
    del got[POSITION_IDS], got["alphas_cumprod"], got["betas"]
    assert_matches(got, want)
    printed = capsys.readouterr().out
    for rule in ("dropped 7 model_ema.* keys", "renamed", "position_ids: not averaged", "repaired",
                 "2 non-model keys (alphas_cumprod, betas) copied from old"):
        assert rule in printed, rule
    assert any("renamed" in n for n in result.notes)
    assert load_pipeline(str(result.file)).unet is not None


def test_ckpt_inputs_go_through_the_safe_loader(tiny, tmp_path, monkeypatch):
    files, _ = tiny
    ckpt = write_single_file(tmp_path / "m1.ckpt", load_file(files[1]))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    monkeypatch.setattr("dbnb.family.sd1.singlefile.REOPEN_BYTES", 100_000)  # the .ckpt is loaded again, safely
    result = run([files[0], ckpt], tmp_path, weights=[1, 3])
    assert len(calls) > 1 and all(kw.get("weights_only") is True for kw in calls)
    a, b = load_file(files[0]), load_file(files[1])
    assert_matches(load_file(result.file), {k: 0.25 * a[k] + 0.75 * b[k] for k in a})

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return open, (str(marker), "w")

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**load_file(files[1]), "x": Evil()}}, evil)
    with pytest.raises(UnsafeCheckpointError, match="did not open it"):
        run([files[0], evil], tmp_path / "e")
    assert not marker.exists()


def test_url_input_is_downloaded_to_the_cache(tiny, tmp_path):
    files, _ = tiny
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files[1].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{files[1].name}"
        result = run([files[0], url], tmp_path)
    finally:
        server.shutdown()
    a, b = load_file(files[0]), load_file(files[1])
    assert_matches(load_file(result.file), {k: 0.5 * a[k] + 0.5 * b[k] for k in a})
    assert result.inputs[1]["label"] == "m1" and result.inputs[1]["short_hash"] == short_hash(files[1])


def test_hub_id_input_offline_from_the_cache(tiny, tmp_path):
    _, folders = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "dbnb" / "hub" / "models--dbnb-test--tiny-sd"  # models.fetch_model's cache: DBNB_CACHE/hub
    snapshot = repo / "snapshots" / commit
    for sub in ("unet", "vae", "text_encoder"):  # what the merge reads: configs and weights
        (snapshot / sub).mkdir(parents=True)
        for f in (folders[1] / sub).iterdir():
            (snapshot / sub / f.name).write_bytes(f.read_bytes())
    (snapshot / "model_index.json").write_bytes((folders[1] / "model_index.json").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent(f"""
        from dbnb.ship.merge import merge
        r = merge([{str(folders[0])!r}, "dbnb-test/tiny-sd"], out_file={str(tmp_path / "hub.safetensors")!r},
                  dtype="fp32", progress=False)
        print("RECIPE", r.recipe)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DBNB_CACHE=str(tmp_path / "dbnb"), HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RECIPE m0 1, tiny-sd 1" in done.stdout
    want = load_file(run([folders[0], folders[1]], tmp_path / "local").file)
    assert_matches(load_file(tmp_path / "hub.safetensors"), want, exact=True)


# --- errors --------------------------------------------------------------------------------------

def test_weights_that_do_not_match_the_models_are_refused(tiny, tmp_path):
    files, _ = tiny
    with pytest.raises(MergeError, match=r"2 weights for 3 models \(m0, m1, m2\)"):
        run(files, tmp_path, weights=[1, 2])
    with pytest.raises(MergeError, match="exactly three models"):
        run(files[:2], tmp_path, mode="add_difference")
    with pytest.raises(MergeError, match="sum to 0"):
        run(files[:2], tmp_path, weights=[1, -1])
    with pytest.raises(MergeError, match="takes alpha, not weights"):
        run(files, tmp_path, mode="add_difference", weights=[1, 1, 1])
    assert not (tmp_path / "merged.safetensors").exists()


def test_models_of_different_architectures_are_refused(tiny, tmp_path):
    files, _ = tiny
    sd = load_file(files[1])
    conv_in = UNET + "input_blocks.0.0.weight"
    inpaint = write_single_file(tmp_path / "inpaint.safetensors",
                                {**sd, conv_in: torch.zeros(sd[conv_in].shape[0], 9, 3, 3)})
    with pytest.raises(MergeError, match=r"m0 and inpaint are different architectures: .*input_blocks\.0\.0"):
        run([files[0], inpaint], tmp_path)
    fewer = write_single_file(tmp_path / "fewer.safetensors",
                              {k: v for k, v in sd.items() if "output_blocks.2" not in k})
    with pytest.raises(MergeError, match="different architectures: their unet keys differ"):
        run([files[0], fewer], tmp_path)
    sdxl = write_single_file(tmp_path / "xl.safetensors", {**sd, "conditioner.embedders.0.x": torch.zeros(1)})
    with pytest.raises(MergeError, match="xl .*SDXL"):
        run([files[0], sdxl], tmp_path)


def test_a_missing_vae_is_an_error_unless_it_comes_from_the_primary(tiny, tmp_path):
    files, _ = tiny
    no_vae = write_single_file(tmp_path / "novae.safetensors",
                               {k: v for k, v in load_file(files[1]).items() if not k.startswith(VAE)})
    with pytest.raises(MergeError, match="novae has no vae.*include_vae=False"):
        run([files[0], no_vae], tmp_path)
    got = load_file(run([files[0], no_vae], tmp_path, include_vae=False).file)
    assert all(torch.equal(got[k], v) for k, v in load_file(files[0]).items() if k.startswith(VAE))
    with pytest.raises(MergeError, match="must be complete"):
        run([no_vae, files[0]], tmp_path, include_vae=False, overwrite=True)


def test_outputs_are_never_silently_replaced(tiny, tmp_path):
    files, _ = tiny
    with pytest.raises(MergeError, match="is one of the inputs"):
        run(files[:2], tmp_path, out_file=files[0], overwrite=True)
    run(files[:2], tmp_path)
    with pytest.raises(MergeError, match=r"exists; .*overwrite=True \(CLI: --overwrite\)"):
        run(files[:2], tmp_path)
    with pytest.raises(MergeError, match=r"normalize=False \(CLI: --as-given\)"):
        run(files[:2], tmp_path, weights=[1.0, -1.0], overwrite=True)


def test_a_result_that_cannot_fit_in_ram_is_refused_before_the_inputs_are_read(tiny, tmp_path, monkeypatch):
    """As an fp32 SDXL merge (13 GiB) on a free Colab: said with the fp16 size, instead of the kernel dying."""
    import psutil

    files, _ = tiny
    # this machine's real free RAM, against an overhead as large as all of it: the tiny result cannot fit
    monkeypatch.setattr("dbnb.ship.merge.MERGE_OVERHEAD_BYTES", psutil.virtual_memory().total)
    with pytest.raises(MergeError) as said:
        run(files[:2], tmp_path, dtype="fp32")
    message = str(said.value)
    assert "fp32 result in RAM" in message and "GiB free" in message and "dtype='fp16'" in message
    assert not (tmp_path / "merged.safetensors").exists()


def test_an_unwritable_destination_is_named_before_any_work(tiny, tmp_path, capsys):
    from dbnb.faces.cli import main

    files, _ = tiny
    (tmp_path / "a-file").write_text("x")
    for flag in ("--out", "--diffusers"):
        target = tmp_path / "a-file" / ("m.safetensors" if flag == "--out" else "m")
        assert main(["merge", str(files[0]), str(files[1]), flag, str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dbnb: Cannot write the merged model to {target.parent}"), err
        assert "input" not in err  # refused before reading the inputs


# --- hashes, names and the merged model in use ----------------------------------------------------

def test_short_hashes_are_printed_and_kept_in_the_metadata(tiny, tmp_path, capsys):
    files, _ = tiny
    result = run(files[:2], tmp_path, weights=[0.6, 0.4], name="my mix")
    printed = capsys.readouterr().out
    hashes = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files[:2]]
    assert [short_hash(f) for f in files[:2]] == [h[:10] for h in hashes]
    assert result.short_hash == hashlib.sha256(result.file.read_bytes()).hexdigest()[:10]
    for h in (*hashes, result.short_hash):
        assert h[:10] in printed
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sd_merge_models"]).keys() == set(hashes)
    assert [i["short_hash"] for i in json.loads(meta["dbnb_merge"])["inputs"]] == [h[:10] for h in hashes]
    assert meta["dbnb_merge_name"] == "my mix"
    # the inputs by their file names: the merged file must not show the user's local paths
    assert [i["source"] for i in json.loads(meta["dbnb_merge"])["inputs"]] == [f.name for f in files[:2]]
    assert str(files[0].parent) not in "".join(meta.values())
    sidecar = json.loads(result.file.with_suffix(".json").read_text())
    assert [i["source"] for i in sidecar["dbnb_merge"]["inputs"]] == [f.name for f in files[:2]]
    assert sidecar["dbnb_merge"]["short_hash"] == result.short_hash
    assert "m0 0.6, m1 0.4" in sidecar["description"]


def test_the_same_merge_gives_the_same_file_and_hash(tiny, tmp_path):
    files, _ = tiny  # safetensors alone writes its metadata in a random order; dbnb sorts it
    first, second = (run(files, tmp_path / d, weights=[5, 2.7, 2], dtype="fp16") for d in "ab")
    assert first.short_hash == second.short_hash
    assert first.file.read_bytes() == second.file.read_bytes()
    assert not list(tmp_path.glob("*/.*"))  # no staged or temporary files left


def test_recipe_names_in_the_reports_format():
    assert recipe(["NAI", "any", "gape", "SD1.4"], [5, 2.7, 2, 0.3]) == "NAI 5, any 2.7, gape 2, SD1.4 0.3"
    text = recipe(["Any", "NAI nsfw", "NAI sfw"], mode="add_difference", alpha=0.4)
    assert text == "Any + (NAI nsfw − NAI sfw) × 0.4"
    assert file_stem(text) == "Any+(NAI_nsfw-NAI_sfw)x0.4"


def test_the_merged_model_trains_and_exports(tiny, tmp_path):
    files, folders = tiny
    result = run([files[0], folders[1], files[2]], tmp_path, mode="add_difference", alpha=0.4, dtype="fp16",
                 out_file=None, out_dir=tmp_path / "merged")
    info = json.loads((result.folder / "dbnb_merge.json").read_text())
    assert info["short_hash"] == result.short_hash == short_hash(*weight_files(result.folder))
    instance, _ = write_dataset(tmp_path / "data", n_instance=2)
    config = Config(pretrained_model_name_or_path=str(result.folder), instance_data_dir=str(instance),
                    instance_prompt="hnzk girl", output_dir=str(tmp_path / "runs"), run_name="merged",
                    resolution=64, max_train_steps=2, save_every_steps=0, learning_rate=1e-4,
                    mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False)
    trained = train(config, progress=False)
    assert trained.step == 2 and not trained.cancelled
    exported = export(trained.run_dir)
    assert exported.verified and exported.path.is_file()
