"""The notebooks as users run them: top to bottom in a real kernel, parameters injected
(papermill), each reading the previous one's files from the workspace. No network."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean_with_one_parameters_cell_and_no_definitions(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "strip outputs before committing"
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill)"
    assert "#@param" in "".join(tagged[0]["source"]), "the parameters cell is a Colab form"
    for c in code:
        source = "".join(c["source"])
        tree = ast.parse(re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M))  # shell / magic lines
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]
        if c not in tagged:
            assert len(source.splitlines()) <= 12, "cells stay short: the work belongs in dbnb"
    text = "".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "markdown")
    assert re.search(r"[\u3040-\u30ff]", text), "Japanese alongside the English"


def run(path, tmp_path, **parameters):
    import papermill

    out = tmp_path / f"out-{path.name}"
    papermill.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    return out


def test_notebooks_run_in_order_on_the_tiny_model(tiny_dir, embedders, tmp_path):
    from dbnb.demo import draw_character
    from dbnb.prep import write_stand_in_model

    ws, pictures = tmp_path / "ws", tmp_path / "pictures"
    pictures.mkdir()
    for i in range(3):  # originals of another size, as users bring them
        draw_character(i, size=96).save(pictures / f"hnzk_{i}.png")
    segmenter = write_stand_in_model(tmp_path / "seg.onnx")

    run(ROOT / "notebooks" / "01_setup.ipynb", tmp_path, workspace=str(ws), install=False,
        pretrained_model_name_or_path=str(tiny_dir))
    assert f"pretrained_model_name_or_path: {tiny_dir}" in (ws / "config.yaml").read_text()

    run(ROOT / "notebooks" / "02_dataset.ipynb", tmp_path, workspace=str(ws), dataset_source=str(pictures),
        resolution=64, segmentation_model=str(segmenter), instance_token="hnzk", class_token="girl")
    prepared = sorted((ws / "dataset").glob("*.png"))
    assert len(prepared) == 3 and all(p.with_suffix(".txt").is_file() for p in prepared)
    assert (ws / "dataset" / "prep_report.json").is_file()

    run(ROOT / "notebooks" / "03_regularization.ipynb", tmp_path, workspace=str(ws), class_prompt="girl",
        class_images_mode="transparent")
    assert len(list((ws / "class_images").glob("*.png"))) == 30  # the seed's 10x
    assert "num_class_images: 30" in (ws / "config.yaml").read_text()

    run(ROOT / "notebooks" / "04_train.ipynb", tmp_path, workspace=str(ws), run_name="nb", resolution=64,
        max_train_steps=4, save_every_steps=2, sample_every_steps=2, mixed_precision="no",
        use_8bit_adam=False, gradient_checkpointing=False, learning_rate=1e-4, instance_prompt="hnzk girl",
        class_prompt="girl", with_prior_preservation=True, num_samples=1, sample_steps=2)
    run_dir = ws / "runs" / "nb"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run_dir / "samples" / "step-000004" / "grid.png").is_file()
    assert (run_dir / "exports" / "nb_4.safetensors").is_file() and (run_dir / "exports" / "README.md").is_file()
    assert "## 学習対象 / Target" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert "30 class images" in (tmp_path / "out-04_train.ipynb").read_text()

    clip, dino = embedders
    run(ROOT / "notebooks" / "05_test_prompts.ipynb", tmp_path, workspace=str(ws), run_name="nb", test_seeds=2,
        test_infer_steps=2, clip_model=str(clip), dino_model=str(dino))
    assert len(list((run_dir / "tests").glob("grid-*.png"))) >= 2 and (run_dir / "tests" / "index.html").is_file()
    scores = json.loads((run_dir / "scores.json").read_text())
    assert scores["recommendation"]["checkpoint"] in ("step-000002", "step-000004")
    assert "recommended checkpoint: **step-00000" in (run_dir / "report.md").read_text(encoding="utf-8")
