"""The `dbnb` command as users type it."""
import json

from dbnb.cli import main


def test_demo_trains_and_says_where_everything_is(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "demo" / "runs" / "demo"
    assert f"run folder:            {run}" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run / "samples" / "step-000004" / "grid.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["with_prior_preservation"] and config["hflip"] is False
    # transparent class images, 10x the instance images, as the seed's community does it
    assert len(list((tmp_path / "demo" / "data" / "class").glob("*.png"))) == 10 * len(
        list((tmp_path / "demo" / "data" / "instance").glob("*.png")))


def test_make_tiny_model_writes_both_layouts(tmp_path, capsys):
    assert main(["make-tiny-model", str(tmp_path / "m"), "--single-file", str(tmp_path / "m.safetensors")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file() and (tmp_path / "m.safetensors").is_file()
    assert (tmp_path / "m" / "tokenizer" / "vocab.json").is_file()


def test_doctor_reports_cpu_only_and_fallbacks(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "training will run on CPU only" in out and "SDPA" in out and "AdamW" in out


def test_train_errors_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("instance_data_dir: /nonexistent\ninstance_prompt: x\nmixed_precision: 'no'\n"
                                     f"output_dir: {tmp_path}\npretrained_model_name_or_path: {tmp_path}/none\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbnb: ") and "Traceback" not in err
