"""Every setting that names a file, folder or URL, given what Colab users give: a path that is
not there, the wrong kind (a file for a folder, a folder for a file), a .zip, a URL that fails
and a Google Drive link. Each goes in through the call its notebook makes (train, prepare_dataset,
make_class_images, export) and ends in the right result or a dbnb error that names the setting
or the file. The "network" is a web server on 127.0.0.1 and the `drive` fixture's fake Drive,
read by the real urllib / gdown."""
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import dataset_with_class_images

from dbnb.core.config import Config
from dbnb.core.errors import DbnbError
from dbnb.prep import prepare_dataset
from dbnb.prep.classimages import make_class_images
from dbnb.ship.export import export
from dbnb.train.loop import train

CASES = ("missing", "wrong_kind", "zip", "url_fails", "drive")


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zipped(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in files_of(folder).items():
            z.writestr(name, data)
    return archive


@pytest.fixture(scope="module")
def made(tiny_dir, tmp_path_factory):
    """What the cases are made of, once: the tiny model as a folder and a single file, a VAE
    folder, the pictures (and class pictures) as folders and zips, and a trained run to export."""
    from dbnb.world.tiny import build_tiny_pipeline, make_tiny_model

    root = tmp_path_factory.mktemp("inputs")
    make_tiny_model(root / "model", single_file=root / "tiny.safetensors")
    build_tiny_pipeline(seed=1).vae.save_pretrained(root / "vae")
    instance, klass = dataset_with_class_images(root / "data", n_instance=2, class_per_instance=2)
    base = dict(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                class_data_dir=str(klass), instance_prompt="hnzk girl", class_prompt="girl", num_class_images=4,
                output_dir=str(root / "runs"), run_name="run", resolution=64, max_train_steps=1,
                save_every_steps=0, sample_every_steps=0, lr_scheduler="constant", lr_warmup_steps=0,
                mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False,
                remove_background=False, class_images_mode="import", with_prior_preservation=True)
    run = train(Config(**base), progress=False).run_dir
    return SimpleNamespace(root=root, base=base, run=run, instance=instance, klass=klass,
                           single=root / "tiny.safetensors", vae=root / "vae",
                           model_zip=zipped(tiny_dir, root / "model.zip"), pictures_zip=zipped(instance, root / "pics.zip"))


def given(case: str, expects: str, made, drive, http_server, folder_link, file_link) -> str:
    """The value a user types for a setting that `expects` "folder", "file" (a model or VAE:
    file or folder) or "source" (a folder, .zip or link to bring pictures from)."""
    if case == "missing":  # relative, as typed in a form: read from the cwd
        return "models/missing.safetensors" if expects == "file" else "my pictures/missing"
    if case == "wrong_kind":
        if expects == "folder" or expects == "source":
            (made.tmp / "notes.docx").write_text("not pictures")
            return str(made.tmp / "notes.docx")
        (made.tmp / "not-a-model" / "pics").mkdir(parents=True)  # a folder, but no model in it
        return str(made.tmp / "not-a-model")
    if case == "zip":
        return str(made.model_zip if expects == "file" else made.pictures_zip)
    if case == "url_fails":
        return f"{http_server.url}/gone/{'model.safetensors' if expects == 'file' else 'pics.zip'}"
    return folder_link() if expects != "file" or folder_link is not None else file_link()


# setting → (what it expects, how the user's call is made, what each case must end in: "ok", or
# the words the error must hold besides the setting's name or the value given)
def train_with(**settings):
    def call(made):
        config = Config(**{**made.base, "output_dir": str(made.tmp / "runs"), **settings})
        return train(config, progress=False).step == 1
    return call


SETTINGS = {
    "pretrained_model_name_or_path": ("file", {"missing": "does not exist", "wrong_kind": "model_index.json",
                                               "zip": "unzip", "url_fails": "404", "drive": "ok"}),
    "pretrained_vae_name_or_path": ("file", {"missing": "does not exist", "wrong_kind": "without config.json",
                                             "zip": "unzip", "url_fails": "404", "drive": "ok"}),
    "dataset_source": ("source", {"missing": "does not exist", "wrong_kind": "notes.docx", "zip": "ok",
                                  "url_fails": "404", "drive": "ok"}),
    "instance_data_dir": ("folder", {"missing": "does not exist", "wrong_kind": "not a folder", "zip": "Extract",
                                     "url_fails": "dataset_source", "drive": "dataset_source"}),
    "class_images_import": ("source", {"missing": "does not exist", "wrong_kind": "notes.docx", "zip": "ok",
                                       "url_fails": "404", "drive": "ok"}),
    "class_data_dir": ("folder", {"missing": "does not exist", "wrong_kind": "not a folder", "zip": "Extract",
                                  "url_fails": "class_images_import", "drive": "class_images_import"}),
    "output_dir": ("folder", {"missing": "ok", "wrong_kind": "is a file", "zip": "is a file",
                              "url_fails": "a folder on this machine", "drive": "a folder on this machine"}),
    "export_to": ("folder", {"missing": "ok", "wrong_kind": "is a file", "zip": "is a file",
                             "url_fails": "a folder on this machine", "drive": "--to drive"}),
}


def user_call(setting: str, value: str, made):
    """The call the setting's notebook makes with it; True when it did what was asked."""
    if setting in ("pretrained_model_name_or_path", "pretrained_vae_name_or_path", "instance_data_dir",
                   "class_data_dir", "output_dir"):
        return train_with(**{setting: value})(made)
    if setting == "dataset_source":  # notebook 02
        config = Config(**{**made.base, "dataset_source": value, "instance_data_dir": str(made.tmp / "prepared")})
        return len(prepare_dataset(config, progress=False, face_detector=None).images) == 2
    if setting == "class_images_import":  # notebook 03
        config = Config(**{**made.base, "class_images_import": value, "class_data_dir": str(made.tmp / "class")})
        return make_class_images(config).have == 2
    return export(made.run, to=value).path.is_file()  # notebook 04: export_to


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_path_setting_ends_in_the_result_or_a_named_error(setting, case, made, drive, http_server, tmp_path,
                                                                  monkeypatch):
    expects, outcomes = SETTINGS[setting]
    monkeypatch.chdir(tmp_path)
    made.tmp = tmp_path
    if setting == "pretrained_model_name_or_path":
        links = dict(folder_link=None, file_link=lambda: drive.file("tiny.safetensors", made.single.read_bytes()))
    elif setting == "pretrained_vae_name_or_path":
        links = dict(folder_link=lambda: drive.folder("my vae", files_of(made.vae)), file_link=None)
    else:
        links = dict(folder_link=lambda: drive.folder("pictures", files_of(made.instance)), file_link=None)
    value = given(case, expects, made, drive, http_server, **links)
    want = outcomes[case]
    if want == "ok":
        assert user_call(setting, value, made)
        return
    with pytest.raises(DbnbError) as caught:
        user_call(setting, value, made)
    message = str(caught.value)
    named = setting if setting != "export_to" else "--to"
    assert named in message or value in message, message
    if case == "missing":  # a relative path is shown as read, from the cwd
        assert str(tmp_path / value) in message, message
    assert want in message, message
