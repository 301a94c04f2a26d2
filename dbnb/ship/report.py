"""A run's training report in the seed's format (学習レポート), and a model card for the Hub.

The seed's community shares each run under fixed headings — DB model hash (the commit of the
Dreambooth extension that trained it, not a file's hash), target, source images, processing,
processed set, regularization images, base model, LR and settings, the reliable way to call
it, the result. `write_report` fills in everything the run folder and its inputs record; what
only the user knows (the character's name, the stable call, the result) is a visible fill-in
line — rendered markdown hides HTML comments, so a comment would be a blank nobody sees —
beside the scorer's suggestion when there is one. Facts that do not exist are said to be
missing, never invented.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dbnb import __version__
from dbnb.core.config import FAMILY_DEFAULTS, FIELDS, PRESETS, Config, from_dict, load_config
from dbnb.core.config.model import BASE_LICENCES
from dbnb.core.disk import format_bytes
from dbnb.core.source_names import hub_repo, public_name
from dbnb.core.versions import dbnb_version
from dbnb.data.dataset import list_images
from dbnb.family.base import card_of, resolve_clip_skip
from dbnb.family.render import ZERO_SNR_GUIDANCE_RESCALE
from dbnb.prep.report import bucket_line, framing_line
from dbnb.run.checkpoints import STATE, dir_size
from dbnb.run.folder import RunFolder
from dbnb.ship.hashes import short_hash  # the webui's model hash: first 10 hex of SHA-256
from dbnb.ship.kohya import is_lora_file
from dbnb.train.optimizers import rates_of

# What the user fills in, shown as it is in the rendered report (see the module's doc).
USER_FIELD = "**【ここに記入 / fill in】**"
FILL_IN = {
    "target": "キャラ名（作品名）、例: 花月(アズールレーン) / the character (its series)",
    "call": "安定して出た呼び出し方、例: Instance prompt+Class promptネガ / the prompt that calls it reliably",
    "result": "再現度・汎用性、うまく出なかった所 / how faithful and how flexible it is, what failed",
}


# --- what the run folder and its inputs know -----------------------------------------------------

def training_time(run: RunFolder) -> tuple[int, float]:
    """(last step, seconds trained). Each resumed session's clock starts again at 0."""
    if not run.log_path.is_file():
        return 0, 0.0
    records = [json.loads(line) for line in run.log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    seconds, previous = 0.0, 0.0
    for r in records:
        if r["time"] < previous:
            seconds += previous
        previous = r["time"]
    return (records[-1]["step"] if records else 0), seconds + previous


def prep_facts(config: Config) -> dict | None:
    path = Path(config.instance_data_dir) / "prep_report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def base_model_facts(source: str) -> dict:
    """Where the base model came from, its short hash when it is one file, its merge recipe."""
    path = Path(source)
    facts = {"source": source, "hash": None, "recipe": None}
    if path.is_file():
        facts["hash"] = short_hash(path)
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            facts["recipe"] = json.loads(sidecar.read_text(encoding="utf-8")).get("dbnb_merge", {}).get("recipe")
    elif (path / "dbnb_merge.json").is_file():
        merge = json.loads((path / "dbnb_merge.json").read_text(encoding="utf-8"))
        facts["hash"], facts["recipe"] = merge.get("short_hash"), merge.get("recipe")
    return facts


def sampling_words(sampling: dict | None) -> str:
    """How the base model samples (base_model.json's `sampling`), and for v-prediction what renders it right."""
    if not sampling:
        return "sampling not recorded (the run started before dbnb recorded it)"
    if sampling["prediction_type"] != "v_prediction":
        return "ε-prediction"
    zero_snr = sampling.get("rescale_betas_zero_snr")
    rescale = (f"; its previews and test images rescale the guidance by {ZERO_SNR_GUIDANCE_RESCALE} (ComfyUI's "
               "RescaleCFG node), without which zero-terminal SNR over-exposes") if zero_snr else ""
    return ("v-prediction" + (" with zero-terminal SNR" if zero_snr else "") + ": render it as v-prediction, as its "
            "base needs (the webui and ComfyUI read that from a base file that marks it; else ComfyUI's "
            f"ModelSamplingDiscrete node set to v_prediction{', zsnr on' if zero_snr else ''}){rescale}")


def family_line(run: RunFolder, config: Config) -> str:
    """The base model's family, how it samples and the clip skip it was trained at: what a user sets to
    render the result as it was trained."""
    family = run.family
    return (f"{card_of(family).short} ({family.name}); {sampling_words(run.base_record().get('sampling'))}; "
            f"clip skip {resolve_clip_skip(family, config.clip_skip)}")


def changed_settings(config: Config, family: str = "sd1") -> list[tuple[str, object, object]]:
    """(name, value, preset value) for settings that differ from the seed's person preset with the
    defaults of the base model's `family` (FAMILY_DEFAULTS: an SDXL run at 1024 px changed nothing),
    plus the ones every seed report states."""
    preset = from_dict({**PRESETS["person"], **FAMILY_DEFAULTS.get(family, {})}).to_dict()
    values = config.to_dict()
    return [(name, values[name], preset[name]) for name in FIELDS
            if FIELDS[name].metadata["report"] == "always"
            or (FIELDS[name].metadata["report"] == "if changed" and values[name] != preset[name])]


# --- the sections -------------------------------------------------------------------------------

def _label(name: str) -> str:
    return FIELDS[name].metadata["label"]


def section_images(config: Config, prep: dict | None) -> tuple[list[str], list[str], list[str], int]:
    """(使用素材 source, 加工 processing, 加工後素材詳細 processed set) lines, and the number of
    training images (the class images are given as a multiple of it)."""
    pictures = list_images(config.instance_data_dir, "instance_data_dir")
    count = len(pictures)
    # with bucketing each picture trains at its shape's bucket, not at one square
    shape = bucket_line(pictures, config) or f"{config.resolution}×{config.resolution}"
    if prep is None:
        return ([f"{count} images in `{config.instance_data_dir}` (not prepared with `dbnb prep`: source unknown)"],
                ["not recorded (the set was not made with `dbnb prep`)"],
                [f"{count} images, {shape} at training"], count)
    files = prep["files"]
    status = Counter(f["status"] for f in files)
    done = Counter(step for f in files for step in f.get("done", []))
    source = [f"{len(files)} source files" + (f" from `{config.dataset_source}`" if config.dataset_source else "")
              + " (" + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + ")"]
    processing = [f"{step} ({n} files)" for step, n in done.most_common()] or ["nothing beyond checks"]
    counts = prep.get("counts", {})
    processed = [f"{count} images, {shape}" + (f"; {framing_line(counts, prep.get('detector'))}" if counts else "")]
    processed += [f"warning: {w}" for w in prep.get("warnings", [])]
    return source, processing, processed, count


def section_class_images(config: Config, instance_count: int) -> list[str]:
    if not config.with_prior_preservation:
        return ["none (prior preservation off) / 正則化画像なし"]

    found = list_images(config.class_data_dir, "class_data_dir")
    how = {"generate": f"generated with the base model from `{config.class_prompt}` (CFG "
                       f"{config.class_guidance_scale:g}, {config.class_infer_steps} steps, {config.class_sampler})",
           "transparent": f"fully transparent images, trained as `{config.background_color}` images",
           "black": "opaque black images (what the old extension trained transparent ones as)",
           "import": f"imported from `{config.class_images_import}`"}[config.class_images_mode]
    lines = [f"{config.num_class_images} used of {len(found)} in `{config.class_data_dir}`: {how}"]
    if instance_count:  # the seed's reports give the count as a multiple: 学習画像の10倍
        ratio = f"{round(config.num_class_images / instance_count, 1):g}"
        lines.append(f"学習画像の{ratio}倍 / {ratio}× the training images "
                     f"({config.num_class_images} for {instance_count})")
    return lines + [f"class prompt: `{config.class_prompt}`, prior loss weight {config.prior_loss_weight:g}"]


def section_lora(run: RunFolder, config: Config, exports: list[Path]) -> list[str]:
    """A LoRA run's shape, and its file's size (what decides Drive quota and webui load time)."""
    if not config.use_lora:
        return []
    alpha = config.lora_alpha or config.lora_rank
    line = (f"LoRA: rank {config.lora_rank}, alpha {alpha:g}, conv rank (LoCon) {config.lora_conv_rank}, "
            f"text-encoder rank {config.lora_text_encoder_rank}")
    if exports:
        newest = max(exports, key=lambda p: p.stat().st_mtime_ns)
        line += f"; file {newest.name} {newest.stat().st_size / 2**20:.1f} MiB"
    return [line]


def section_disk(run: RunFolder) -> list[str]:
    """What the run takes on disk, measured: the figure the seed's "2 GB per model" stood for."""
    found = run.checkpoints()
    if not found:
        return ["no checkpoint saved yet"]
    newest = found[-1].path
    states = [c.path / STATE for c in found if (c.path / STATE).is_dir()]
    what = "LoRA adapters" if found[-1].kind == "lora" else "fp16 weights"
    line = f"{len(found)} checkpoint(s), {format_bytes(dir_size(newest) - dir_size(newest / STATE))} of {what} each"
    if states:
        line += f"; {len(states)} resume state(s) of {format_bytes(dir_size(states[-1]))}"
    return [line + f"; the run folder holds {format_bytes(dir_size(run.root))}"]


def section_result(run: RunFolder) -> tuple[list[str], list[str], dict | None]:
    """(安定した呼び出し方 suggestion, 結果 lines, recommendation) from scores.json when scored."""
    path = run.scores_file(".json")
    if not path.is_file():
        return (["no scores yet (`dbnb score RUN`)"], ["not scored yet: run `dbnb score` for CLIP-I / DINO / "
                                                        "CLIP-T per checkpoint"], None)
    data = json.loads(path.read_text(encoding="utf-8"))
    rec = data["recommendation"]
    rows = {r["checkpoint"]: r for r in data["rows"]}
    best = rows.get(rec["checkpoint"], {})
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    if data.get("score_with") == "world":  # pixel analysis of the tiny world (dbnb.evaluate.scorers.world.metrics)
        figures = ", ".join(f"{c} {fmt(best.get(c))}" for c in data["columns"][2:])
    else:
        figures = (f"CLIP-I {fmt(best.get('clip_i'))}, DINO {fmt(best.get('dino'))}, CLIP-T {fmt(best.get('clip_t'))} "
                   "(DreamBooth paper, SD: CLIP-I 0.803, DINO 0.668, CLIP-T 0.305)")
    lines = [f"recommended checkpoint: **{rec['checkpoint']}** ({rec['reason']})", f"rule: {rec['rule']}", figures]
    return [f"suggestion: the instance prompt at {rec['checkpoint']}"], lines, rec


def grids(run: RunFolder) -> list[Path]:
    return run.test_grids() + run.preview_grids()


def section_trainer(run: RunFolder) -> list[str]:
    """DBモデルハッシュ: the seed's reports give the commit of the extension that trained the run
    (725d85ca…, the version the guide pins), so a reader can train with the same code. Here: the
    dbnb version and commit that config.json recorded when the run started."""
    recorded = (run.saved_config() or {}).get("dbnb_version")
    line = f"`{recorded}`" if recorded else (f"not recorded (the run started before dbnb recorded its version); "
                                             f"this report was written by `{dbnb_version()}`")
    return [line, "ガイドの「DBモデルハッシュ」は学習に使った拡張機能のコミットで、モデルファイルのハッシュでは"
                  "ありません。dbnb ではこのバージョンとコミットがそれにあたります。ファイルのハッシュは"
                  "「モデルハッシュ」の欄です / the guide's DB model hash is the trainer's commit, not the "
                  "file's hash, which is under Model hash"]


def _value(value) -> str:
    """A setting as the seed's reports write it: ON / OFF for a switch (Apply Horizontal FlipOFF)."""
    return ("ON" if value else "OFF") if isinstance(value, bool) else str(value)


# --- the report ----------------------------------------------------------------------------------

def report_markdown(run_dir: str | Path) -> str:
    run = RunFolder(run_dir)
    config = load_config(run.config_path)
    prep = prep_facts(config)
    source, processing, processed, instance_count = section_images(config, prep)
    call, result, _ = section_result(run)
    base = base_model_facts(config.pretrained_model_name_or_path)
    exports = sorted(run.exports_dir.glob("*.safetensors")) + sorted(run.exports_dir.glob("*.ckpt"))
    step, seconds = training_time(run)
    settings = [f"{_label(n)} (`{n}`): {_value(v)}" + ("" if v == p else f" (preset: {_value(p)})")
                for n, v, p in changed_settings(config, run.family.name)]
    lines = [f"# {config.run_name} — training report / 学習レポート", ""]

    def section(title: str, body: list[str], fill_in: str = "", first: bool = False):
        asked = [f"{USER_FIELD} {FILL_IN[fill_in]}"] if fill_in else []
        body = asked + body if first else body + asked
        lines.extend([f"## {title}", *[f"- {b}" for b in body], ""])

    section("DBモデルハッシュ / Trainer version", section_trainer(run))
    section("学習対象 / Target", [f"instance prompt `{config.instance_prompt}`"
                                 + (f", class `{config.class_prompt}`" if config.class_prompt else "")],
            "target", first=True)
    section("使用素材 / Source images", source)
    section("加工 / Processing", processing)
    section("加工後素材詳細 / Processed set", processed)
    section("正則化画像 / Regularization images", section_class_images(config, instance_count))
    section("ベースモデル / Base model", [f"`{base['source']}`" + (f" [{base['hash']}]" if base["hash"] else ""),
                                         family_line(run, config)]
            + ([f"merge: {base['recipe']}"] if base["recipe"] else []))
    section("LR等のステータス設定 / LR and other settings",
            settings + section_lora(run, config, exports)
            + [f"trained {step} of {config.max_train_steps} steps in {seconds / 60:.1f} min"])
    section("モデルハッシュ / Model hash",
            [f"`{short_hash(p)}` {p.name} (the webui's model hash of the exported file)" for p in exports[-1:]]
            or ["not exported yet (`dbnb export RUN`)"])
    section("ディスク / Disk", section_disk(run))
    section("安定した呼び出し方 / Stable call", call, "call")
    section("結果 / Result", result + [f"grid: [{p.relative_to(run.root)}]({p.relative_to(run.root)})"
                                      for p in grids(run)], "result")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report.md"
    path.write_text(report_markdown(run_dir), encoding="utf-8")
    return path


def file_words(exported: Path, family: str, lora: bool) -> str:
    """Where the exported file goes in the webui and ComfyUI; `family`: its family's short name."""
    if lora:
        return (f"a LoRA in kohya's layout for {family} bases: the webui's models/Lora folder, ComfyUI's "
                "models/loras; use it on the base model below")
    return (f"one {exported.suffix} in the original {family} layout: the webui's models/Stable-diffusion folder, "
            "ComfyUI's models/checkpoints")


def model_card(run_dir: str | Path, exported: Path) -> Path:
    """README.md with YAML metadata beside an exported file (what the Hub shows)."""
    import yaml  # lazy: loads yaml

    run = RunFolder(run_dir)
    config = load_config(run.config_path)
    card, lora = card_of(run.family), is_lora_file(exported)
    source = config.pretrained_model_name_or_path
    repo = hub_repo(source)  # also where notebook 01 left a Hub model; other paths and URLs mean nothing on the Hub
    known = repo in BASE_LICENCES
    licence, name, link = BASE_LICENCES[repo] if known else (card.license, "", "")
    meta = {"license": licence, **({"license_name": name, "license_link": link} if name else {}),
            "library_name": "dbnb", "pipeline_tag": "text-to-image",
            "tags": [*card.tags, "text-to-image", "dreambooth", *(["lora"] if lora else []), "dbnb"],
            "instance_prompt": config.instance_prompt, **({"base_model": repo} if repo else {})}
    unknown = [] if known else [
        f"- licence: `{card.license}` above is {card.short}'s own; a base with a licence of its own (Illustrious, "
        "NoobAI and Pony have one) binds what is trained from it: set `license` to the base's before publishing"]
    _, result, _ = section_result(run)
    body = [f"# {config.run_name}", "",
            f"{'LoRA' if lora else 'DreamBooth fine-tune'} of {card.title} made with dbnb {__version__}. "
            f"Call it with `{config.instance_prompt}`.", "",
            f"- file: `{exported.name}` ({file_words(exported, card.short, lora)})",
            f"- base model: `{public_name(source)}`, {family_line(run, config)}",
            f"- resolution {config.resolution}, {config.max_train_steps} steps, "
            f"learning rate {rates_of(config)[0]:g}",  # the UNet's: a LoRA's is lora_learning_rate
            *[f"- {line}" for line in result], *unknown, ""]
    path = exported.parent / "README.md"
    path.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body),
                    encoding="utf-8")
    return path
