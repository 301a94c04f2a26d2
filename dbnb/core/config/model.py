"""The base model a workspace trains from (notebook 01): frozen with a run, as the weights it starts from."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import setting


# The base models users of anime characters train from, as the notebooks and the form offer them:
# Hub id, or a file's URL where the repo holds single files -> what it is (English, Japanese).
# Pony Diffusion V6 XL has no Hub copy of its own: it comes from Civitai as one .safetensors (a
# URL, Drive link or file path, which the field takes).
ILLUSTRIOUS_XL = ("https://huggingface.co/OnomaAIResearch/Illustrious-xl-early-release-v0/resolve/main/"
                  "Illustrious-XL-v0.1.safetensors")
BASE_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (
        "SD 1.5, the guide's family (512 px; anime merges such as Anything are SD 1.x files)",
        "SD 1.5。ガイドと同じ系統（512 px。Anything などのアニメ系マージも SD 1.x）"),
    # A Hub repo of single files (no diffusers model; a "GUIDED" file beside it): the file by its URL.
    ILLUSTRIOUS_XL: (
        "Illustrious-XL 0.1: SDXL anime base trained on Danbooru tags (1024 px)",
        "Illustrious-XL 0.1。Danbooru タグで学習した SDXL のアニメ系ベース（1024 px）"),
    "Laxhar/noobai-XL-1.1": (
        "NoobAI-XL eps 1.1: Illustrious continued on Danbooru and e621 (1024 px)",
        "NoobAI-XL eps 1.1。Illustrious を Danbooru と e621 で追加学習（1024 px）"),
    "Laxhar/noobai-XL-Vpred-1.0": (
        "NoobAI-XL v-pred 1.0: v-prediction; what you train from it needs v-pred sampling in the webui / ComfyUI",
        "NoobAI-XL v-pred 1.0。v-prediction モデルなので、学習結果も webui / ComfyUI で v-pred 設定が必要"),
    "cagliostrolab/animagine-xl-4.0": (
        "Animagine XL 4.0: SDXL anime base (1024 px)", "Animagine XL 4.0。SDXL のアニメ系ベース（1024 px）"),
}

# Their licences as their Hub cards give them (license, license_name, license_link), by repo: what is
# trained from a base is bound by its licence (the FAIPL: "any use of this model and its variants"),
# so the model card of an export names it (dbnb.ship.report.model_card).
FAIPL = ("other", "fair-ai-public-license-1.0-sd", "https://freedevproject.org/faipl-1.0-sd/")
BASE_LICENCES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("creativeml-openrail-m", "", ""),
    "stabilityai/stable-diffusion-xl-base-1.0": ("openrail++", "", ""),
    "OnomaAIResearch/Illustrious-xl-early-release-v0": FAIPL,
    "Laxhar/noobai-XL-1.1": FAIPL,
    "Laxhar/noobai-XL-Vpred-1.0": FAIPL,
    "cagliostrolab/animagine-xl-4.0": ("openrail++", "", ""),
}


@dataclass(frozen=True)
class ModelSettings:
    """The base model: the checkpoint and VAE a run starts from, set in notebook 01 (step setup)."""

    # --- Model ---------------------------------------------------------------------------
    pretrained_model_name_or_path: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "Model", "Source Checkpoint",
        "Base model: a diffusers folder, a Hugging Face repo id, a single .safetensors/.ckpt "
        "file, an https:// URL or a Google Drive link; SD 1.x or SDXL (Illustrious, NoobAI, Pony, Animagine), "
        "told from the model itself. A merged model is fine.",
        help_ja="ベースモデル。diffusers 形式のフォルダ、Hugging Face の repo id、.safetensors/.ckpt の単体ファイル、"
                "https:// の URL、Google ドライブのリンクが使えます。SD 1.x か SDXL（Illustrious・NoobAI・Pony・Animagine）かは"
                "モデルから判別します。マージモデルでもOK。", learns=False, report="apart",
        suggestions=tuple(BASE_MODELS))
    revision: str = setting("", "Model", "Revision",
                            "Hub revision (branch, tag or commit) when the base model is a repo id.",
                            help_ja="ベースモデルを repo id で指定したときに使う Hub のリビジョン（ブランチ、タグ、"
                                    "コミット）。", report="apart")
    pretrained_vae_name_or_path: str = setting(
        "", "Model", "Pretrained VAE Name or Path",
        "Optional separate VAE (folder, repo id or file). Empty: the base model's own VAE.",
        help_ja="別の VAE を使うときに指定します（フォルダ、repo id、ファイル）。"
                "空欄ならベースモデル内蔵の VAE を使います（ガイドでも空欄）。", learns=False, report="apart")
