"""The one config: every setting dbnb reads, with its default, help and the name users know.

`Config` is a frozen dataclass. The CLI's `key=value`, the notebooks' parameters cell, the
ipywidgets form and each run's `config.json` are views of it; nothing else holds a setting.
Names follow diffusers' `train_dreambooth.py` where it has one; `label` is the name in the
AUTOMATIC1111 Dreambooth extension (what the seed's users look for), `section` the
extension's tab group.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dbnb.core.errors import DbnbError

# The seed's "汎用ネガ" (generic quality negative), used for class images and previews.
QUALITY_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                    "fewer digits, cropped, worst quality, low quality, normal quality, "
                    "jpeg artifacts, signature, watermark, blurry")

SECTIONS = ("Model", "Directories", "Dataset", "Prompts", "Class Images", "Intervals", "Learning Rate",
            "Image Processing", "Tuning", "Gradients", "Samples", "Test Prompts")

# Images one training preview may render (sample prompts × num_samples) before the run warns:
# each is a full generation while training waits (dbnb.train.previews.warn_many_previews).
FEW_PREVIEWS = 4

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")


class ConfigError(DbnbError, ValueError):
    """A setting is wrong. The message names each field and says how to fix it."""


# The notebook step that owns each section's settings: its parameters cell is the only one
# that writes them to the workspace; later notebooks read them (a field may name another).
STEPS = {"setup": "01_setup", "dataset": "02_dataset", "class_images": "03_regularization",
         "train": "04_train", "test": "05_test_prompts"}
SECTION_STEPS = {"Model": "setup", "Directories": "train", "Dataset": "dataset", "Prompts": "train",
                 "Class Images": "class_images", "Intervals": "train", "Learning Rate": "train",
                 "Image Processing": "train", "Tuning": "train", "Gradients": "train", "Samples": "train",
                 "Test Prompts": "test"}


def setting(default, section: str, label: str, help: str, choices: tuple = (), help_ja: str = "",
            step: str = "", minimum: float | None = None, above: float | None = None,
            maximum: float | None = None,
            learns: bool = True, memory_saving=None, report: str = "if changed"):
    """One setting and every fact about it.

    `label` is the webui extension's name; `help` (English) and `help_ja` (Japanese, for the
    seed's readers) are shown under the field in the form and in `dbnb config --list`; `step`
    is the notebook step that owns it (default: its section's). The value must be at least
    `minimum` / greater than `above`, and at most `maximum`. `learns`: it changes what the run learns
    (rates, schedule, optimizer, seed, data, prompts, what is trained), so a resumed run must keep
    it; False for what only changes memory, speed, what is saved or shown, prep and tests. `memory_saving`:
    the value (or values) that lowers VRAM, named after an out-of-memory stop when not set.
    `report`: in the training report "always", "if changed" from the preset, or "apart"
    (paths and prompts, which have their own headings)."""
    assert section in SECTIONS, section
    step = step or SECTION_STEPS[section]
    assert step in STEPS, step
    assert report in ("always", "if changed", "apart"), report
    return field(default=default, metadata=dict(section=section, label=label, help=help, help_ja=help_ja,
                                                 choices=choices, step=step, minimum=minimum, above=above, maximum=maximum,
                                                 learns=learns, memory_saving=memory_saving,
                                                 report=report))


@dataclass(frozen=True)
class Config:
    # --- Model ---------------------------------------------------------------------------
    pretrained_model_name_or_path: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "Model", "Source Checkpoint",
        "Base model: a diffusers folder, a Hugging Face repo id, a single .safetensors/.ckpt "
        "file, an https:// URL or a Google Drive link. A merged model is fine.",
        help_ja="ベースモデル。diffusers 形式のフォルダ、Hugging Face の repo id、.safetensors/.ckpt の単体ファイル、"
                "https:// の URL、Google ドライブのリンクが使えます。マージモデルでもOK。", learns=False, report="apart")
    revision: str = setting("", "Model", "Revision",
                            "Hub revision (branch, tag or commit) when the base model is a repo id.",
                            help_ja="ベースモデルを repo id で指定したときに使う Hub のリビジョン（ブランチ、タグ、"
                                    "コミット）。", report="apart")
    pretrained_vae_name_or_path: str = setting(
        "", "Model", "Pretrained VAE Name or Path",
        "Optional separate VAE (folder, repo id or file). Empty: the base model's own VAE.",
        help_ja="別の VAE を使うときに指定します（フォルダ、repo id、ファイル）。"
                "空欄ならベースモデル内蔵の VAE を使います（ガイドでも空欄）。", learns=False, report="apart")

    # --- Directories ---------------------------------------------------------------------
    instance_data_dir: str = setting("", "Directories", "Dataset Directory",
                                     "Folder with the character's training images (+ optional .txt captions). "
                                     "The seed recommends 5-10 good pictures: quality over quantity.",
                                     help_ja="キャラの学習画像を入れたフォルダ（.txt のキャプションは任意）。"
                                             "ガイドのおすすめは 5〜10 枚で、枚数より質が大事です。", step="dataset", report="apart")
    class_data_dir: str = setting("", "Directories", "Classification Dataset Directory",
                                  "Folder with the class (regularization) images.",
                                  help_ja="正則化画像（クラス画像）を入れたフォルダ。", step="class_images", report="apart")
    output_dir: str = setting("dbnb-runs", "Directories", "Model Directory",
                              "Where run folders are written. On Colab put it on Drive so a lost session loses nothing.",
                              help_ja="学習フォルダの保存先。Colab ではセッションが切れても消えないよう、"
                                      "Google ドライブ上にしてください。", step="setup", learns=False, report="apart")
    run_name: str = setting("run", "Directories", "Name",
                            "The run folder's name under output_dir; also the exported file's name.",
                            help_ja="output_dir の下に作る学習フォルダの名前で、"
                                    "書き出すモデルファイルの名前にもなります。", report="apart", learns=False)
    concepts_list: str = setting("", "Directories", "Concepts List",
                                 "Optional JSON file listing several concepts (instance_data_dir, instance_prompt, "
                                 "class_data_dir, class_prompt each). Replaces the single-concept fields.",
                                 help_ja="複数のコンセプトを並べた JSON ファイル（各項目に instance_data_dir・instance_prompt・class_data_dir・class_prompt）。"
                                         "指定すると、コンセプト 1 つ用の欄の代わりにこちらを使います。"
                                         "ガイドの使い方では不要（空欄）です。", report="apart")

    # --- Dataset -------------------------------------------------------------------------
    dataset_source: str = setting("", "Dataset", "Source Images",
                                  "Folder, .zip, Google Drive link or URL list (.txt) of the original pictures; "
                                  "`dbnb prep` writes the prepared set to instance_data_dir.",
                                  help_ja="元画像の場所（フォルダ、.zip、Google ドライブのリンク、URL 一覧の .txt）。"
                                          "`dbnb prep` が加工した画像を instance_data_dir に書き出します。"
                                          "元画像は変更しません。", report="apart", learns=False)
    remove_background: bool = setting(True, "Dataset", "Remove Background",
                                      "Cut the character out with anime-segmentation and put it on background_color "
                                      "(the seed: clutter and backgrounds get learnt too).",
                                      help_ja="anime-segmentation でキャラを切り抜き、"
                                              "背景を background_color（既定は白）で塗りつぶします。"
                                              "ガイドにあるとおり、"
                                              "背景や花びら・文字などの不純物まで強く覚えてしまうため、"
                                              "白背景にするのが大事です。", learns=False)
    segmentation_model: str = setting("skytnt/anime-seg", "Dataset", "Segmentation Model",
                                      "anime-segmentation ONNX model: a Hub repo holding isnetis.onnx, or a local .onnx file.",
                                      help_ja="anime-segmentation の ONNX モデル。"
                                              "isnetis.onnx が入った Hub のリポジトリか、ローカルの .onnx ファイル。", learns=False)
    square_mode: str = setting("pad", "Dataset", "Make Square",
                               "pad: whole picture on a square of background_color (no straight-cut bands; the seed's "
                               "advice). center: center crop. face: crop around the detected face.",
                               choices=("pad", "center", "face"),
                               help_ja="正方形にする方法。pad: "
                                       "切り取らずに background_color の余白を足して正方形にします（ガイドのおすすめ。"
                                       "まっすぐ切り取った跡が学習されません）。center: 中央を正方形に切り抜きます。"
                                       "face: 検出した顔を中心に切り抜きます。", learns=False)
    extra_framings: bool = setting(False, "Dataset", "Add Bust-up / Cowboy-shot Crops",
                                   "Also derive bust-up and cowboy-shot crops from full-body pictures (the seed's "
                                   "花月 workflow). Face-only close-ups are never made: the seed found they hurt.",
                                   help_ja="全身画像からバストアップとカウボーイショットの画像も切り出して追加します（ガイドの花月での水増しの手順）。"
                                           "顔だけのドアップは特定の場面で邪魔になるとされているので作りません。", learns=False)
    keep_alpha: bool = setting(
        False, "Dataset", "Keep Transparency",
        "Write the cut-out (from remove_background or the picture's own transparency) as an RGBA PNG instead "
        "of putting it on background_color, padding transparent too. With alpha_mask_loss the trainer then "
        "learns only the character, not the background.",
        help_ja="切り抜いた画像（背景除去、または元画像の透過）を background_color で塗らず、"
                "透過 PNG のまま保存します（余白も透明）。alpha_mask_loss と一緒に使うと、"
                "背景は学習せずキャラだけを学習します。", learns=False)
    caption_template: str = setting("[instance_token] [class_token]", "Dataset", "Caption Template",
                                    "Text written to each image's .txt for [filewords]; [instance_token] and "
                                    "[class_token] are filled in, add tags after them.",
                                    help_ja="[filewords] 用に各画像の .txt に書く文。"
                                            "[instance_token] と [class_token] は自動で埋まるので、"
                                            "タグはその後ろに足します。", learns=False)
    caption_mode: str = setting(
        "template", "Dataset", "Caption Mode",
        "template: caption_template for every picture. tags: booru tags from a WD14 tagger (tagger_model), "
        "as 'instance_token, class_token, tags…' (kohya's and the webui's tag style; caption_template is "
        "not used).",
        choices=("template", "tags"),
        help_ja="template: すべての画像に caption_template を書きます。tags: "
                "WD14 タガー（tagger_model）が付けた booru タグを「instance_token, class_token, "
                "タグ…」の形で書きます（kohya や webui と同じ形式。caption_template は使いません）。", learns=False)
    tagger_model: str = setting(
        "SmilingWolf/wd-swinv2-tagger-v3", "Dataset", "WD14 Tagger Model",
        "WD14-family tagger for caption_mode=tags: a Hub repo id or a local folder holding model.onnx + "
        "selected_tags.csv. Runs with onnxruntime (on the GPU with onnxruntime-gpu).",
        help_ja="caption_mode=tags で使う WD14 系のタガー。Hub のリポジトリ id か、"
                "model.onnx と selected_tags.csv を置いたローカルフォルダ。"
                "onnxruntime で動きます（onnxruntime-gpu があれば GPU で）。", learns=False)
    tag_threshold: float = setting(
        0.35, "Dataset", "General Tag Threshold",
        "A general tag is written when the tagger's probability is above this (kohya's --general_threshold).",
        help_ja="一般タグのしきい値。タガーの確率がこれを超えたタグを書きます（kohya の --general_threshold）。", above=0, maximum=1, learns=False)
    character_tag_threshold: float = setting(
        0.85, "Dataset", "Character Tag Threshold",
        "A character-name tag is written when its probability is above this (kohya's --character_threshold).",
        help_ja="キャラ名タグのしきい値。確率がこれを超えたら書きます（kohya の --character_threshold）。", above=0, maximum=1, learns=False)
    prune_core_tags: bool = setting(
        True, "Dataset", "Prune Core Tags",
        "Leave out of the captions the body-trait tags (hair, eyes, ears, …) and character-name tags found in "
        "at least core_tag_share of the pictures, so the trigger word learns them (the usual practice for "
        "character models). The prep report lists what was left out.",
        help_ja="画像の core_tag_share 以上に共通する髪・目などの特徴タグとキャラ名タグをキャプションから外し、"
                "その特徴をトリガーワードに覚えさせます（キャラ学習の定番）。外したタグは前処理のレポートに出ます。", learns=False)
    core_tag_share: float = setting(
        0.8, "Dataset", "Core Tag Share",
        "With prune_core_tags: the share of pictures (0-1) a body-trait tag must appear in to be left out.",
        help_ja="prune_core_tags でタグを外す基準。そのタグが付いた画像の割合（0〜1）がこれ以上なら外します。", above=0, maximum=1, learns=False)

    # --- Prompts -------------------------------------------------------------------------
    instance_prompt: str = setting(
        "", "Prompts", "Instance Prompt",
        "Prompt that calls the character: the guide's two words, a rare name and a throwaway word (its reversal "
        "is easy to remember), e.g. 'nanU Unan', where class_prompt is the second word 'Unan'. Why two: the first "
        "word takes the look, the second the meaning; 'nanU Unan' calls both strongly, and when 'Unan' fights "
        "other prompts (an outfit or pose that will not come), drop it and prompt 'nanU' alone, which one word "
        "cannot do (the guide also found one word learns less exactly). Not a common word such as 1girl: the "
        "class images teach the second word. May contain [filewords].",
        help_ja="キャラを呼び出すプロンプト。ガイドの2語方式: 学習対象の名前（珍しい単語）+ 半角スペース + 適当な単語"
                "（名前を反転させたものが覚えやすい）。例: 'nanU Unan'、class_prompt は2語目の 'Unan'。2語にする理由: "
                "nanU に絵柄、Unan に意味が付き、'nanU Unan' で強力に呼び出せる。Unan が他のプロンプトの邪魔をする"
                "（服やポーズの指示が効かない）ときは Unan を外して 'nanU' だけにでき、1語ではこの切り離しができない"
                "（1語だと学習精度も落ちるとされる）。1girl など普段使う単語は避ける（正則化画像が2語目を学習するため）。"
                "[filewords] も使えます。", report="apart")
    class_prompt: str = setting(
        "", "Prompts", "Class Prompt",
        "Prompt of the class images: the second word of the instance prompt, a throwaway word such as 'Unan' "
        "(for 'nanU Unan'). The class images teach this word what they show, so with transparent / black ones it "
        "comes to mean a plain picture: never a word you prompt with (girl, 1girl, person …; the guide: 'if it "
        "were girl, you would be stuck the day you want to use girl'). A common word only with generated or "
        "imported class pictures of it. May contain [filewords].",
        help_ja="正則化画像（クラス画像）のプロンプト。インスタンスプロンプトの2語目、意味のない単語（'nanU Unan' なら "
                "'Unan'）。正則化画像の内容がこの単語に学習されるので、透過・黒の画像なら無地の絵を意味するようになります。"
                "girl・1girl・person など普段使う単語にしないこと（ガイド:「ここを仮にgirlにした場合、ふとgirlを使用したい"
                "場面が出た時に困ってしまう」）。普段の単語は生成・取り込みの実画像のときだけ。[filewords] も使えます。",
        step="class_images", report="apart")
    instance_token: str = setting("", "Prompts", "Instance Token",
                                  "With [filewords]: the character's token, inserted into captions that lack it.",
                                  help_ja="[filewords] を使うときのキャラの単語（例: nanU）。"
                                          "キャプションになければ自動で入れます。"
                                          "[filewords] を使わないなら空欄で構いません。", step="dataset", report="apart")
    class_token: str = setting(
        "", "Prompts", "Class Token",
        "The class word, put after the instance token in captions ([filewords]); the notebooks build the prompts "
        "from the two ('nanU' + 'Unan': instance prompt 'nanU Unan', class prompt 'Unan'). A throwaway word, not "
        "1girl: see class_prompt.",
        help_ja="クラスの単語。キャプション（[filewords]）で instance token の後ろに置かれ、ノートブックはこの2つから"
                "プロンプトを作ります（'nanU' + 'Unan' → インスタンスプロンプト 'nanU Unan'、クラスプロンプト 'Unan'）。"
                "1girl ではなく意味のない単語に（class_prompt の説明を参照）。", step="dataset", report="apart")
    # kohya sd-scripts' caption options, with its names and meaning (`process_caption`).
    shuffle_caption: bool = setting(
        False, "Prompts", "Shuffle Caption",
        "Each step, shuffle the comma-separated tags of the prompt (after [filewords] is filled in), so no "
        "tag order is learnt. The first keep_tokens tags stay in place. Class prompts are treated the same.",
        help_ja="ステップごとにプロンプトのタグ（カンマ区切り。[filewords] の展開後）をシャッフルし、"
                "タグの順番を覚えないようにします。先頭の keep_tokens 個はそのまま。"
                "正則化画像のプロンプトも同じです。")
    keep_tokens: int = setting(
        0, "Prompts", "Keep N Tokens",
        "With shuffle_caption / caption_tag_dropout_rate: the first N comma-separated tags stay first and "
        "are never dropped. 1 keeps 'nanU Unan' (the trigger) in front.",
        help_ja="先頭の N 個のタグ（カンマ区切り）はシャッフルもドロップもしません。1 ならトリガーワード（例: "
                "nanU Unan）が常に先頭に残ります。", minimum=0)
    caption_dropout_rate: float = setting(
        0.0, "Prompts", "Rate of Caption Dropout",
        "Share of steps (0-1) in which a picture's whole prompt is replaced by the empty prompt.",
        help_ja="画像のプロンプトを丸ごと空にするステップの割合（0〜1）。", minimum=0, maximum=1)
    caption_tag_dropout_rate: float = setting(
        0.0, "Prompts", "Rate of Tag Dropout",
        "Each step, each tag after the first keep_tokens is left out with this probability (0-1).",
        help_ja="ステップごとに、keep_tokens より後のタグをそれぞれこの確率（0〜1）で省きます。", minimum=0, maximum=1)

    # --- Class Images --------------------------------------------------------------------
    with_prior_preservation: bool = setting(
        False, "Class Images", "Use Class Images (prior preservation)",
        "Train on class images beside the instance images so the class word keeps its meaning.",
        help_ja="学習画像と一緒に正則化画像も学習し、クラスの単語（1girl など）の意味が崩れないようにします。"
                "過学習しにくくなるとされています。")
    num_class_images: int = setting(0, "Class Images", "Total Number of Class/Reg Images",
                                    "How many class images to use. Must not exceed what the class folder holds "
                                    "(the seed warns: make it match the folder).",
                                    help_ja="使う正則化画像の枚数。"
                                            "正則化画像フォルダに入っている枚数を超えないようにしてください（ガイドでも「フォルダの中身の枚数と必ず一致させて」と念押しされています）。", minimum=0)
    prior_loss_weight: float = setting(1.0, "Class Images", "Prior Loss Weight",
                                       "Weight of the class-image loss against the instance loss.",
                                       help_ja="学習画像の loss に対する、正則化画像の loss の重み。", minimum=0)
    class_negative_prompt: str = setting(QUALITY_NEGATIVE, "Class Images", "Classification Image Negative Prompt",
                                         "Negative prompt when generating class images.",
                                         help_ja="正則化画像を生成するときのネガティブプロンプト。", learns=False)
    class_guidance_scale: float = setting(12.0, "Class Images", "Classification CFG Scale",
                                          "CFG scale when generating class images (the seed: 12).",
                                          help_ja="正則化画像を生成するときの CFG スケール（ガイドでは 12）。", learns=False)
    class_infer_steps: int = setting(28, "Class Images", "Classification Steps",
                                     "Sampling steps when generating class images (the seed: 28).",
                                     help_ja="正則化画像を生成するときのサンプリングステップ数（ガイドでは 28）。", minimum=1, learns=False)
    class_images_mode: str = setting(
        "generate", "Class Images", "Class Image Source",
        "generate: with the base model and class_prompt. transparent: fully transparent PNGs, "
        "the seed community's trick; the trainer puts them on background_color (white), "
        "so they train as plain white images. black: opaque black images, "
        "what the old extension trained the transparent ones as (it dropped the alpha); "
        "to reproduce that choose black here, not background_color=black, "
        "which would blacken your pictures' background too. import: copy from class_images_import.",
        choices=("generate", "transparent", "black", "import"),
        help_ja="generate: ベースモデルと class_prompt で生成します。transparent: スレ定番の全面透過 PNG。"
                "学習では background_color（白）で塗られ、真っ白な画像として学習されます。black: 不透明な黒い画像。"
                "旧拡張機能はアルファを捨てていたので、透過画像は黒として学習されていました。"
                "それを再現するならここを black にします（background_color=black にすると学習画像の背景まで黒くなります）。"
                "import: class_images_import からコピーします。", learns=False)
    class_images_import: str = setting("", "Class Images", "Import Class Images From",
                                       "Folder, .zip or Google Drive link to copy class images from (mode import).",
                                       help_ja="正則化画像のコピー元のフォルダ、.zip、"
                                               "Google ドライブのリンク（import のとき）。", learns=False)
    class_sampler: str = setting("dpmpp_2m", "Class Images", "Classification Sampler",
                                 "Sampler for generated class images.", choices=("ddim", "euler_a", "dpmpp_2m"),
                                 help_ja="正則化画像を生成するときのサンプラー。", learns=False)
    class_seed: int = setting(0, "Class Images", "Classification Seed",
                              "Seed of class image k is class_seed + k, so a rerun regenerates the same images.",
                              help_ja="k 枚目の正則化画像のシードは class_seed + k。やり直しても同じ画像ができます。", minimum=0, learns=False)
    class_batch_size: int = setting(0, "Class Images", "Class Image Batch Size",
                                    "Images generated at once; 0 picks it from free VRAM.",
                                    help_ja="一度に生成する枚数。0 なら空き VRAM から自動で決めます。", minimum=0, learns=False)

    # --- Intervals -----------------------------------------------------------------------
    max_train_steps: int = setting(
        3000, "Intervals", "Training Steps",
        "Total optimizer steps of the whole run. The seed's runs (text encoder trained): ~3000 for 3 images "
        "(7000 for 5 was called maybe too many); 10000-20000 for 20-100 images with detailed outfits. Aim for "
        "slightly overfit, then check flexibility (notebook 5). On resume it is still the total: a run stopped at "
        "2000 of 3000 trains 1000 more, where the webui extension trains the set steps again from the stop; "
        "to train N more, set max_train_steps to the step reached + N.",
        help_ja="学習全体の合計ステップ数。ガイドの実例（テキストエンコーダも学習）: 3枚で約3000（5枚で7000は多すぎるかも）、"
                "衣装が細かい20〜100枚で10000〜20000。少し過学習気味が目安。再開しても合計のままです: 3000 のうち 2000 で"
                "止めた学習は残り 1000 だけ進みます（拡張機能は止めた地点から『設定したステップ分』進みます）。さらに N "
                "ステップ進めたいときは、到達したステップ + N を設定してください。", learns=False, report="always")
    num_train_epochs: int = setting(0, "Intervals", "Training Epochs",
                                    "If > 0, train this many epochs instead of max_train_steps. "
                                    "One epoch is as many pictures as the larger of the training images and the class images (the seed's definition; "
                                    "the smaller set repeats): at batch 1 on one GPU, "
                                    "5 pictures with 50 class images make 50 steps an epoch.",
                                    help_ja="0 より大きいと、max_train_steps の代わりにこのエポック数だけ学習します。"
                                            "1 エポックは学習画像と正則化画像の多い方の枚数です（ガイドと同じ定義。"
                                            "少ない方は繰り返し使います）。バッチ 1・GPU 1 枚なら、"
                                            "学習画像 5 枚と正則化画像 50 枚で 1 エポック 50 ステップです。", minimum=0, learns=False)
    save_every_steps: int = setting(
        500, "Intervals", "Save Checkpoint Frequency",
        "Save trained weights + resume state every N steps (0: only at the end), at multiples of N counted from "
        "step 0 of the run, also after a resume (the webui extension counts again from the stop). Every save "
        "keeps its weights: on SD 1.5 1.8 GiB (the fp16 UNet 1.6 GiB + the text encoder 0.23 GiB; +1.6 GiB with "
        "use_ema) where the seed says 2 GB a model; the newest keep_last_n also keep a 5.5 GiB resume state "
        "(4.8 GiB without the text encoder). The default run (3000 steps, every 500) needs about 22 GiB at its "
        "peak; the run checks what it needs against the free space before its first step. The seed: 500 is "
        "enough; small values fill the disk.",
        help_ja="N ステップごとに学習済みの重みと再開用データを保存（0: 最後だけ）。学習の開始（ステップ 0）から数えた N の"
                "倍数で保存し、再開後も同じです（拡張機能は中断地点から数え直します）。重みは保存ごとに残ります。SD 1.5 では "
                "1 回 1.8 GiB（fp16 の UNet 1.6 GiB + テキストエンコーダ 0.23 GiB。use_ema で +1.6 GiB。ガイドの「一個2GB」"
                "にあたります）、最新 keep_last_n 個には再開用データ 5.5 GiB（テキストエンコーダなしで 4.8 GiB）も付きます。"
                "既定の学習（3000 ステップ、500 ごと）は最大で約 22 GiB 必要で、学習開始前に空き容量と照らし合わせます。"
                "ガイドでは 500 で十分、小さいとディスクを圧迫します。", minimum=0, learns=False)
    sample_every_steps: int = setting(0, "Intervals", "Save Preview(s) Frequency",
                                      "Write preview images every N steps (0: never; the seed turns it off on 12 GB cards).",
                                      help_ja="N ステップごとにプレビュー画像を作ります（0: 作らない）。ガイドでは、"
                                              "VRAM 12GB だと落ちるので 0 推奨。", minimum=0, learns=False, memory_saving=0)
    keep_last_n: int = setting(1, "Intervals", "Keep Last N Resume States",
                               "Resume states older than the newest N are deleted: the fp32 master weights and the "
                               "optimizer's state, on SD 1.5 with 8-bit Adam 5.5 GiB (4.8 GiB without train_text_encoder). Trained weights are kept; "
                               "while a save is written, one more state exists until the oldest goes.",
                               help_ja="最新 N 個より古い再開用データ（fp32 の重みとオプティマイザの状態。SD 1.5 と 8bit Adam で 5.5 GiB、テキストエンコーダを学習しないなら 4.8 GiB）を削除します。学習済みの重みは残ります。保存中は一時的にもう 1 個増えます。", minimum=1, learns=False)

    # --- Learning Rate -------------------------------------------------------------------
    learning_rate: float = setting(1e-6, "Learning Rate", "Learning Rate",
                                   "UNet learning rate. The seed: 1e-6 whatever the number of images; "
                                   "higher is said to hurt flexibility.",
                                   help_ja="UNet の学習率。ガイドでは画像の枚数に関係なく 1e-6（0.000001）。"
                                           "これより大きいと汎用性に問題が出るとされています。", above=0, report="always")
    scale_lr: bool = setting(False, "Learning Rate", "Scale Learning Rate",
                             "Multiply the learning rate by batch size x gradient accumulation x GPUs (diffusers' meaning). "
                             "At batch 1 without accumulation on one GPU (Colab) that is x1: on or off, "
                             "nothing changes. "
                             "It does NOT lower the LR as training goes on (the guide says it does); "
                             "the scheduler does that.",
                             help_ja="学習率に「バッチサイズ × 勾配累積 × GPU 数」を掛けます（diffusers と同じ意味）。"
                                     "バッチ 1・勾配累積 1・GPU 1 枚（Colab など）では 1 倍なので、"
                                     "オンでもオフでも何も変わりません。"
                                     "ガイドには「ステップが進むごとに学習率を下げる機能」とありますが、"
                                     "それはスケジューラ（lr_scheduler）の役目です。", report="always")
    lr_scheduler: str = setting("polynomial", "Learning Rate", "Learning Rate Scheduler",
                                "How the LR changes after the warm-up. "
                                "The seed recommends polynomial (which decays it to 1e-7 by the last step); "
                                "newer versions of the extension start at constant, and the seed says to set it back.",
                                choices=LR_SCHEDULERS,
                                help_ja="ウォームアップ後の学習率の変え方。"
                                        "ガイドのおすすめは polynomial（最後のステップまでに 1e-7 へ下げていきます）。"
                                        "拡張機能の新しいバージョンは初期値が constant ですが、"
                                        "ガイドでは polynomial に戻すのが無難としています。", report="always")
    lr_warmup_steps: int = setting(15, "Learning Rate", "Learning Rate Warmup Steps",
                                   "Steps with the LR rising from 0 (the seed: about 15).",
                                   help_ja="学習の最初に学習率を 0 から徐々に上げるステップ数（ウォームアップ）。"
                                           "学習の初動の無茶な学習を避けるためのもので、ガイドでは 15 くらい。", minimum=0)
    lr_power: float = setting(1.0, "Learning Rate", "Polynomial Power",
                              "Power of the polynomial schedule (1.0: linear decay).",
                              help_ja="polynomial での学習率の下がり方（次数）。1.0 なら直線的に下がります。")
    lr_num_cycles: int = setting(1, "Learning Rate", "Cosine Restarts",
                                 "Number of restarts for cosine_with_restarts.",
                                 help_ja="cosine_with_restarts で学習率を上げ直す回数。", minimum=1)
    train_text_encoder: bool = setting(
        True, "Learning Rate", "Train Text Encoder",
        "Also fine-tune the CLIP text encoder, as the webui extension does by default (and its Auto-Adjust for "
        "12-24 GB): the guide's numbers (LR 1e-6, 3000-20000 steps) were reached with it on. Cost on SD 1.5, "
        "computed, not yet measured by dbnb on a GPU: ~1 GB more VRAM (123 M weights: fp32 master, gradients, "
        "8-bit Adam state), a few % per step, +0.23 GiB a save, +0.7 GiB a resume state; on a T4 (15 GB) the "
        "published 9.92 GB of fp16 + 8-bit Adam + gradient checkpointing becomes ~11 GB, so every "
        "memory_profile tier keeps it on. Off (where it does not fit: an out-of-memory stop names it): only the "
        "UNet learns, the likeness comes more slowly and the guide's step counts are not comparable. With "
        "use_lora this switch is not used: lora_text_encoder_rank > 0 gives the text encoder adapters instead.",
        help_ja="CLIP テキストエンコーダも学習します。拡張機能のデフォルト（と 12〜24GB 向けの Auto-Adjust）と同じで、"
                "ガイドの数値（学習率 1e-6、3000〜20000 ステップ）はこれがオンの状態での結果です。SD 1.5 での負担（計算値、"
                "dbnb の GPU 実測はまだ）: VRAM 約 1GB 増（1.23 億個の重みの fp32 コピー・勾配・8bit Adam の状態）、1ステップ"
                "数%遅く、保存 1 回 +0.23 GiB、再開用データ +0.7 GiB。T4（15GB）では公開値 9.92GB（fp16 + 8bit Adam + "
                "gradient checkpointing）が約 11GB になる計算で、memory_profile のどの段でもオンのままです。オフにすると"
                "（VRAM が足りない場合。メモリ不足で止まったときに案内されます）UNet だけが学習し、似るまでが遅く、"
                "ガイドのステップ数とは比べられません。use_lora では使いません（lora_text_encoder_rank > 0 で"
                "テキストエンコーダにアダプタを付けます）。", memory_saving=False, report="always")
    text_encoder_lr: float = setting(1e-6, "Learning Rate", "Text Encoder Learning Rate",
                                     "Learning rate of the text encoder when it is trained.",
                                     help_ja="テキストエンコーダを学習するときの学習率。", above=0)
    stop_text_encoder: float = setting(1.0, "Learning Rate", "Step Ratio of Text Encoder Training",
                                       "Fraction of the run (0-1) after which the text encoder is frozen.",
                                       help_ja="学習全体のこの割合（0〜1）を過ぎたらテキストエンコーダの学習を止めます。"
                                               "1.0 なら最後まで学習します。", minimum=0, maximum=1)

    use_lora: bool = setting(
        False, "Learning Rate", "Use LORA",
        "Train LoRA adapters instead of the whole UNet: a file of tens of MB that the webui puts on any base "
        "model (<lora:name:0.8>), less VRAM, faster steps. Uses lora_learning_rate, not learning_rate.",
        help_ja="UNet 全体ではなく LoRA アダプタを学習します。数十 MB のファイルになり、webui でどのベースモデルにも"
                "重ねられます（<lora:名前:0.8>）。VRAM が少なく、速く学習できます。学習率は learning_rate ではなく "
                "lora_learning_rate を使います。")
    lora_rank: int = setting(32, "Learning Rate", "Lora UNET Rank",
                             "LoRA rank (kohya's network_dim) of the UNet's attention / feed-forward layers.",
                             help_ja="UNet の attention / feed-forward 層の LoRA のランク（kohya の network_dim）。")
    lora_alpha: float = setting(0.0, "Learning Rate", "Lora Alpha",
                                "LoRA alpha (kohya's network_alpha): adapters act at alpha / rank. 0: the rank "
                                "(scale 1).",
                                help_ja="LoRA の alpha（kohya の network_alpha）。アダプタは alpha / rank の強さで効きます。"
                                        "0: ランクと同じ（倍率 1）。", minimum=0)
    lora_conv_rank: int = setting(0, "Learning Rate", "Lora Conv Rank (LoCon)",
                                  "Rank of LoCon adapters on the ResNet convs and up/down samplers (kohya's "
                                  "conv_dim; alpha keeps the alpha / rank ratio). 0: attention / linear layers only.",
                                  help_ja="ResNet の畳み込み層と up/down サンプラーにも付ける LoCon のランク（kohya の "
                                          "conv_dim。alpha は alpha / rank の比を保ちます）。0: attention / 線形層だけ。", minimum=0)
    lora_text_encoder_rank: int = setting(0, "Learning Rate", "Lora Text Encoder Rank",
                                          "Rank of LoRA adapters on every text-encoder layer (q/k/v/out and MLP). "
                                          "0: the text encoder is not trained.",
                                          help_ja="テキストエンコーダの全層（q/k/v/out と MLP）に付ける LoRA のランク。"
                                                  "0: テキストエンコーダは学習しません。", minimum=0)
    lora_learning_rate: float = setting(1e-4, "Learning Rate", "Lora UNET Learning Rate",
                                        "Learning rate of the UNet's adapters (with use_lora).",
                                        help_ja="UNet のアダプタの学習率（use_lora のとき）。", above=0)
    lora_text_encoder_learning_rate: float = setting(5e-5, "Learning Rate", "Lora Text Encoder Learning Rate",
                                                     "Learning rate of the text encoder's adapters (with use_lora).",
                                                     help_ja="テキストエンコーダのアダプタの学習率（use_lora のとき）。", above=0)
    lora_dropout: float = setting(0.0, "Learning Rate", "Lora Dropout",
                                  "Dropout on the adapters' input (kohya's network_dropout). 0: off.",
                                  help_ja="アダプタの入力に掛けるドロップアウト（kohya の network_dropout）。0: オフ。")

    # --- Image Processing ----------------------------------------------------------------
    resolution: int = setting(512, "Image Processing", "Resolution",
                              "Training size in pixels (multiple of 8). SD 1.x: 512.",
                              help_ja="学習解像度（ピクセル、8 の倍数）。SD 1.x は 512（ガイドも 512）。", step="dataset", report="always")
    center_crop: bool = setting(False, "Image Processing", "Center Crop",
                                "Crop the center square instead of resizing the whole image. The seed: "
                                "off (the pictures are already square).",
                                help_ja="画像全体を縮小する代わりに、中央の正方形を切り抜きます。"
                                        "ガイドではオフ（素材は正方形に揃えてあるため）。")
    hflip: bool = setting(False, "Image Processing", "Apply Horizontal Flip",
                          "Randomly mirror images. Off by default: the seed found it mixes the left and right "
                          "colours of asymmetric designs.",
                          help_ja="画像をランダムに左右反転して水増しします。既定はオフ: ガイドでは、"
                                  "左右非対称なデザインだと左右の色が混ざるとされています。", report="always")
    alpha_mask_loss: bool = setting(
        False, "Image Processing", "Alpha Mask",
        "Weight the loss of each pixel by the picture's alpha, scaled to latent size (kohya's --alpha_mask): "
        "transparent parts are not learnt. The picture itself is still put on background_color for the VAE; "
        "pictures without alpha count everywhere. Fully transparent class images are refused (they would add "
        "no loss at all).",
        help_ja="各ピクセルの loss を画像のアルファ値（潜在のサイズに縮小）で重み付けします（kohya の --alpha_mask）。"
                "透明な部分は学習されません。VAE には background_color で塗った画像を渡し、"
                "アルファのない画像は全体を学習します。完全に透明な正則化画像は loss が 0 になるため使えません。")
    background_color: str = setting("white", "Image Processing", "Background Colour",
                                    "Colour that transparent pixels are put on (name or #rrggbb): "
                                    "the cut-out pictures' background and the transparent class images. "
                                    "For class images trained black, as the old extension did, "
                                    "use class_images_mode=black: "
                                    "black here would blacken your pictures' background too.",
                                    help_ja="透過部分を塗る背景色（色名か #rrggbb）。切り抜いた学習画像の背景にも、"
                                            "透過の正則化画像にも使われます。"
                                            "旧拡張機能のように正則化画像を黒で学習したいときは class_images_mode=black にしてください（ここを black にすると学習画像の背景まで黒くなります）。", step="dataset")
    skip_bad_images: bool = setting(
        False, "Image Processing", "Skip Unreadable Images",
        "Train without pictures that cannot be read (damaged, truncated, not a picture), with a warning "
        "naming each. Off: such a picture stops training before the model loads.",
        help_ja="読み込めない画像（破損・途中で切れたファイル・画像でないもの）を警告付きで除いて学習します。"
                "オフなら、そのような画像があるとモデルを読み込む前に学習を止めます。", learns=False)

    # --- Tuning --------------------------------------------------------------------------
    train_batch_size: int = setting(1, "Tuning", "Batch Size", "Images per step (per GPU).",
                                    help_ja="1 ステップあたりの画像の枚数（GPU ごと）。", minimum=1, memory_saving=1, report="always")
    memory_profile: str = setting(
        "manual", "Tuning", "Performance Wizard",
        "manual: mixed_precision, use_8bit_adam and gradient_checkpointing as set here. auto: training sets "
        "those three from the GPU's VRAM at its start and prints what it chose (up to 16 GB, e.g. a T4: fp16 + "
        "8-bit Adam + gradient checkpointing; 24 GB: no checkpointing; 40 GB or more: no 8-bit Adam, bf16 "
        "where the GPU has it; no GPU: fp32; the table is in dbnb/train/memory.py). Until dbnb has been measured on "
        "GPUs (docs/performance.md), auto uses the published figures of other DreamBooth trainers (T4, 512 px, "
        "batch 1, all three on: 9.92 GB).",
        choices=("manual", "auto"),
        help_ja="manual: mixed_precision・use_8bit_adam・gradient_checkpointing を設定どおりに使います。"
                "auto: 学習の開始時に GPU の VRAM からこの3つを決め、選んだ内容を表示します（T4 など 16 GB まで: "
                "fp16 + 8bit Adam + gradient checkpointing、24 GB: checkpointing なし、40 GB 以上: 8bit Adam なし・"
                "対応する GPU では bf16、GPU なし: fp32。表は dbnb/train/memory.py）。dbnb 自身の GPU 実測値"
                "（docs/performance.md）ができるまでは、他の DreamBooth 実装の公開値（T4・512 px・バッチ 1・"
                "3つとも有効で 9.92 GB）に基づきます。", learns=False)
    mixed_precision: str = setting("fp16", "Tuning", "Mixed Precision",
                                   "fp16 (T4 / most Colab GPUs), bf16 (A100/H100) or no (CPU). "
                                   "Weights stay fp32 either way.", choices=("no", "fp16", "bf16"),
                                   help_ja="fp16（T4 など Colab の多くの GPU。ガイドも fp16）、bf16（A100/H100）、"
                                           "no（CPU）。どれを選んでも、学習する重み自体は fp32 のままです。", memory_saving=("fp16", "bf16"), report="always", learns=False)
    optimizer: str = setting(
        "adamw", "Tuning", "Optimizer",
        "adamw: AdamW (8-bit when use_8bit_adam is on, the default). adamw8bit: bitsandbytes' 8-bit AdamW, "
        "whatever use_8bit_adam says (use_8bit_adam=false beside it is refused). prodigy: Prodigy "
        "(pip install prodigyopt), which finds its own step size: its learning rates are multipliers, set "
        "them to 1.0; it has no 8-bit form, so use_8bit_adam does not apply. lion: Lion (bitsandbytes' "
        "8-bit Lion with use_8bit_adam, else 32-bit), usually at a 3-10x smaller learning rate than AdamW. "
        "One that cannot run here falls back to torch's AdamW with a warning.",
        choices=("adamw", "adamw8bit", "prodigy", "lion"),
        help_ja="adamw: AdamW。use_8bit_adam がオンなら 8bit 版になります（既定はオン）。adamw8bit: "
                "bitsandbytes の 8bit AdamW。use_8bit_adam=false と一緒に指定するとエラーです。prodigy: "
                "Prodigy（pip install prodigyopt が必要）。ステップ幅を自動で決めるので学習率は倍率の意味になり、"
                "1.0 にします。8bit 版はないので use_8bit_adam は関係ありません。lion: Lion。"
                "use_8bit_adam がオンなら bitsandbytes の 8bit 版、オフなら 32bit 版です。"
                "学習率は AdamW の 1/3〜1/10 くらいが普通です。この環境で動かないものは、"
                "警告を出して torch の AdamW に切り替えます。")
    use_8bit_adam: bool = setting(True, "Tuning", "Use 8bit Adam",
                                  "bitsandbytes' 8-bit optimizer state: much less VRAM (the seed: "
                                  "a must on 12 GB cards). "
                                  "With optimizer=adamw (the webui's switch for adamw8bit) or lion. "
                                  "Falls back to torch's AdamW with a warning where bitsandbytes does not work.",
                                  help_ja="bitsandbytes の 8bit オプティマイザを使います（optimizer=adamw なら 8bit AdamW、"
                                          "lion なら 8bit Lion）。VRAM を大きく節約でき、"
                                          "ガイドでは 12GB のカードなら必須。bitsandbytes が動かない環境では、"
                                          "警告を出して torch の AdamW に切り替えます。", memory_saving=True, report="always")
    adam_beta1: float = setting(0.9, "Tuning", "Adam Beta 1", "AdamW beta1.",
                                help_ja="AdamW の beta1。")
    adam_beta2: float = setting(0.999, "Tuning", "Adam Beta 2", "AdamW beta2.",
                                help_ja="AdamW の beta2。")
    adam_weight_decay: float = setting(1e-2, "Tuning", "Adam Weight Decay", "AdamW weight decay.",
                                       help_ja="AdamW の weight decay（重み減衰）。")
    adam_epsilon: float = setting(1e-8, "Tuning", "Adam Epsilon", "AdamW epsilon.",
                                  help_ja="AdamW の epsilon。")
    attention: str = setting("sdpa", "Tuning", "Memory Attention",
                             "sdpa: PyTorch's built-in fused attention (no extra install). "
                             "xformers: when it is installed and works on this GPU.",
                             choices=("sdpa", "xformers"),
                             help_ja="sdpa: PyTorch 内蔵の高速な attention（追加のインストール不要）。xformers: "
                                     "xformers がインストール済みで、この GPU で動くときに使えます。", learns=False)
    cache_latents: bool = setting(True, "Tuning", "Cache Latents",
                                  "Encode the images with the VAE once, before training (faster, less VRAM). "
                                  "The extension's 'Don't Cache Latents' is the opposite switch.",
                                  help_ja="学習前に VAE で画像を一度だけエンコードしておきます（速く、"
                                          "VRAM も少なめ）。"
                                          "拡張機能の 「Don't Cache Latents」とは逆の意味のスイッチです（あちらのオン ＝ こちらのオフ）。", memory_saving=True, learns=False)
    use_ema: bool = setting(False, "Tuning", "Train EMA",
                            "Keep an exponential moving average of the UNet, saved beside the raw weights. "
                            "It costs VRAM: an fp32 copy of the UNet, 3.4 GB on SD 1.5 (the seed: "
                            "for 24 GB cards like a 3090), and disk: +1.6 GiB of weights at every save, "
                            "plus its fp32 copy in the resume state. With use_lora only the adapters are averaged: "
                            "a few MB.",
                            help_ja="UNet の指数移動平均（EMA）も保持し、通常の重みと並べて保存します。"
                                    "VRAM を多く使います（UNet の fp32 のコピー分、SD 1.5 で 3.4 GB。"
                                    "ガイドでも 3090 など向け）。ディスクも保存ごとに +1.6 GiB、"
                                    "再開用データにも fp32 のコピーが入ります。"
                                    "use_lora ではアダプタだけなので数 MB です。", memory_saving=False, report="always")
    ema_decay: float = setting(0.9999, "Tuning", "EMA Decay", "Decay of the EMA weights.",
                               help_ja="EMA の減衰率。1 に近いほど長い期間を平均します（0.9999 で約 1 万ステップ）。")
    offset_noise: float = setting(0.0, "Tuning", "Offset Noise",
                                  "Add per-channel noise offset (e.g. 0.05) for darker darks / brighter brights. 0: off.",
                                  help_ja="チャンネルごとのノイズオフセット（例: 0.05）を加え、暗部をより暗く・明部をより明るく出せるようにします。0: オフ。", minimum=0)
    snr_gamma: float = setting(0.0, "Tuning", "Min-SNR Gamma",
                               "Min-SNR loss weighting (e.g. 5.0). 0: off.",
                               help_ja="Min-SNR による loss の重み付け（例: 5.0）。0: オフ。", minimum=0)
    seed: int = setting(1234, "Tuning", "Seed", "Random seed of the run (data order, noise).",
                        help_ja="学習全体の乱数シード（データの順番、ノイズ）。")

    # --- Gradients -----------------------------------------------------------------------
    gradient_accumulation_steps: int = setting(1, "Gradients", "Gradient Accumulation Steps",
                                               "Average gradients over N batches per optimizer step.",
                                               help_ja="N バッチ分の勾配を平均してから 1 回更新します（実質のバッチサイズが N 倍になります）。", minimum=1)
    gradient_checkpointing: bool = setting(True, "Gradients", "Gradient Checkpointing",
                                           "Recompute activations in backward: less VRAM, ~20% slower. The seed: "
                                           "cards like a 3090 can turn it off.",
                                           help_ja="逆伝播のときに途中の計算結果を再計算して VRAM を減らします（速度は約 20% 低下）。"
                                                   "ガイドでは、3090 などならオフにできるとされています。", memory_saving=True, learns=False)
    max_grad_norm: float = setting(1.0, "Gradients", "Max Grad Norms",
                                   "Clip the gradient norm to this value (0: no clipping).",
                                   help_ja="勾配のノルムをこの値でクリップします（0: クリップしない）。", minimum=0)
    optimizer_in_backward: bool = setting(
        False, "Gradients", "Optimizer in Backward",
        "Experimental (not yet compared on a GPU with the default fp16 + 8-bit Adam path). "
        "Step each weight as soon as backward has its gradient, then free that gradient, so the UNet's "
        "full-size gradients (~3.4 GB fp32 for SD 1.5) never exist all at once. Same update as the normal "
        "path. Needs gradient_accumulation_steps=1, max_grad_norm=0, one GPU and mixed_precision bf16 or no "
        "(not fp16).",
        help_ja="実験的な機能（GPU で既定の fp16 + 8-bit Adam との比較はまだ）。逆伝播で勾配が出た重みから順に更新して勾配をすぐ解放するので、UNet の勾配全体（SD 1.5 で fp32 約3.4GB）が一度にメモリに載りません。更新結果は通常と同じ。gradient_accumulation_steps=1、max_grad_norm=0、GPU 1枚、mixed_precision は bf16 か no（fp16 は不可）が必要です。")
    deterministic: bool = setting(
        False, "Gradients", "Deterministic",
        "Reproducible training: the same config gives bit-identical weights, and a resumed run equals the "
        "uninterrupted one. Uses deterministic GPU kernels (cuDNN autotuning off) and, on a CPU, one thread "
        "for backward. Costs speed (see docs/performance.md); off: the fast kernels, whose sums may differ "
        "in the last bits between runs.",
        help_ja="再現性のある学習。同じ設定なら重みがビット単位で同じになり、中断から再開しても中断なしと同じ結果になります。"
                "GPU では決定的なカーネルを使い（cuDNN の自動選択はオフ）、CPU では逆伝播を1スレッドで行うため、その分遅くなります"
                "（docs/performance.md を参照）。オフなら高速なカーネルを使い、実行ごとに末尾の桁がわずかに変わることがあります。",
        learns=False, report="always")

    # --- Samples -------------------------------------------------------------------------
    sample_prompts: tuple[str, ...] = setting((), "Samples", "Sample Image Prompt",
                                              "Preview prompts. Empty: the instance prompt.",
                                              help_ja="プレビュー用のプロンプト。"
                                                      "空欄ならインスタンスプロンプトを使います。", learns=False)
    sample_negative_prompt: str = setting(QUALITY_NEGATIVE, "Samples", "Sample Negative Prompt",
                                          "Negative prompt of the previews.",
                                          help_ja="プレビューのネガティブプロンプト。", learns=False)
    num_samples: int = setting(2, "Samples", "Number of Samples to Generate",
                               "Preview images per sample prompt, at most 16. Each is a full generation while "
                               "training waits: a preview renders prompts × this, and the run warns before its "
                               f"first step when that is more than {FEW_PREVIEWS}. The seed's warning: in the "
                               "extension 5000 here made 5000 images at every preview.",
                               help_ja="サンプルプロンプト 1 つあたりのプレビュー枚数（最大 16）。1 枚ごとに画像を丸ごと"
                                       "生成し、その間は学習が止まります。1 回のプレビューは「プロンプト数 × この値」枚で、"
                                       f"{FEW_PREVIEWS} 枚を超えると学習開始前に警告します。ガイドにもあるとおり、"
                                       "拡張機能でここを 5000 にするとプレビューのたびに 5000 枚作ろうとします。",
                               minimum=1, maximum=16, learns=False)
    sample_seed: int = setting(42, "Samples", "Sample Seed", "Seed of the previews, fixed so steps compare.",
                               help_ja="プレビューのシード。固定なので、ステップごとの変化を見比べられます。", learns=False)
    sample_guidance_scale: float = setting(7.5, "Samples", "Sample CFG Scale", "CFG scale of the previews.",
                                           help_ja="プレビューの CFG スケール。", learns=False)
    sample_steps: int = setting(20, "Samples", "Sample Steps", "Sampling steps of the previews.",
                                help_ja="プレビューのサンプリングステップ数。", minimum=1, learns=False)

    # --- Test Prompts --------------------------------------------------------------------
    # The seed's way to pick a checkpoint: first "<instance prompt>, 1girl, solo" until it looks
    # slightly overfit, then other clothes / places to see it is still flexible.
    test_fidelity_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo",), "Test Prompts", "Fidelity Prompts",
        "Prompts that should show the character as trained; {instance_prompt} and {class_prompt} are filled in.",
        help_ja="学習したとおりのキャラが出るべきプロンプト（再現度を見ます）。"
                "{instance_prompt} と {class_prompt} は自動で埋まります。", learns=False)
    test_flexibility_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo, school uniform, classroom",
         "{instance_prompt}, 1girl, solo, swimsuit, beach",
         "{instance_prompt}, 1girl, solo, winter coat, snowy street"), "Test Prompts", "Flexibility Prompts",
        "Prompts that ask for other clothes / places: a good checkpoint follows them.",
        help_ja="別の服や場所を指定するプロンプト（汎用性を見ます）。良いチェックポイントはこの指定に従います。", learns=False)
    test_negative_prompt: str = setting(QUALITY_NEGATIVE, "Test Prompts", "Test Negative Prompt",
                                        "Negative prompt of the test images (the seed's quality negative).",
                                        help_ja="テスト画像のネガティブプロンプト（ガイドの品質ネガ）。", learns=False)
    test_class_prompt_in_negative: bool = setting(
        False, "Test Prompts", "Class Prompt in Negative",
        "Also put the class prompt in the negative (the seed's 'Instance prompt + Class prompt ネガ' call).",
        help_ja="クラスプロンプトもネガに入れます（ガイドの「Instance prompt + Class prompt ネガ」という呼び出し方）。", learns=False)
    test_seeds: int = setting(4, "Test Prompts", "Seeds per Prompt", "Images per prompt and checkpoint (seeds 0..N-1).",
                              help_ja="プロンプト・チェックポイントごとの枚数（シード 0〜N-1）。", minimum=1, learns=False)
    test_steps: str = setting("all", "Test Prompts", "Checkpoints to Test",
                              "'all', or step numbers like '1000,2000,3000'. The base model is always a baseline row.",
                              help_ja="'all' か、'1000,2000,3000' のようなステップ数。"
                                      "比較用にベースモデルも必ず並べます。", learns=False)
    lora_scale: float = setting(1.0, "Test Prompts", "LoRA Weight",
                                "LoRA runs: the adapters' strength in test images and scores (the webui's "
                                "<lora:name:1.0>).",
                                help_ja="LoRA の学習のとき: "
                                        "テスト画像と採点でのアダプタの強さ（webui の <lora:名前:1.0> の数字）。", learns=False)
    # The guide's 花月 report: close-ups and back views in the set broke wide outputs, which square
    # test images never show; one wide render of the first fidelity prompt lets the scores see it.
    test_wide: float = setting(
        1.5, "Test Prompts", "Wide Test Image",
        "Width ÷ height of one more test image of the first fidelity prompt, as tall as resolution "
        "(1.5 at 512: 768×512; the width is rounded to a multiple of 8). Its fidelity counts in the scores: "
        "close-ups and back views in the training set break wide pictures (the guide's 花月 test). 0: none.",
        help_ja="最初の再現度プロンプトで追加する横長テスト画像の 幅 ÷ 高さ（高さは resolution。512 で 1.5 なら "
                "768×512、幅は 8 の倍数に丸めます）。この画像の再現度も採点に入ります。学習画像にドアップや背面の"
                "画像があると横長の出力が崩れます（ガイドの花月の例）。0 で作りません。",
        minimum=0, maximum=4, learns=False)
    test_guidance_scale: float = setting(7.5, "Test Prompts", "Test CFG Scale", "CFG scale of the test images.",
                                         help_ja="テスト画像の CFG スケール。", learns=False)
    test_infer_steps: int = setting(28, "Test Prompts", "Test Sampling Steps", "Sampling steps of the test images.",
                                    help_ja="テスト画像のサンプリングステップ数。", minimum=1, learns=False)
    clip_model: str = setting("openai/clip-vit-base-patch32", "Test Prompts", "CLIP Model",
                              "CLIP for CLIP-I / CLIP-T scores (Hub id or local folder).",
                              help_ja="CLIP-I / CLIP-T スコア用の CLIP（Hub の id かローカルのフォルダ）。", learns=False)
    dino_model: str = setting("facebook/dino-vits16", "Test Prompts", "DINO Model",
                              "DINO ViT for the DINO fidelity score (Hub id or local folder).",
                              help_ja="DINO スコア（再現度）用の DINO ViT（Hub の id かローカルのフォルダ）。", learns=False)
    score_with: str = setting(
        "clip", "Test Prompts", "Score With",
        "clip: CLIP-I / DINO / CLIP-T (any model). ccip: anime characters — fidelity by deepghs' CCIP "
        "(share of test images judged the same character as the instance pictures), flexibility by tag "
        "adherence (the WD14 tagger, tagger_model, finds the prompt's asked-for tags). world: pixel analysis "
        "of dbnb's tiny world (the demo model): identity, swapped sides, copied poses, hair following the "
        "prompt, class drift.",
        choices=("clip", "ccip", "world"),
        help_ja="clip: CLIP-I / DINO / CLIP-T（どのモデルでも）。ccip: アニメキャラ向け。"
                "再現度は deepghs の CCIP（学習画像と同じキャラと判定された割合）、"
                "汎用性はタグの再現率（プロンプトで指定したタグを WD14 タガーが見つけた割合）。world: "
                "dbnb の小さな世界モデル（デモ）用の画素解析。", learns=False)
    ccip_model: str = setting(
        "deepghs/ccip_onnx", "Test Prompts", "CCIP Model",
        "For score_with=ccip: the Hub repo deepghs/ccip_onnx (its default model), deepghs/ccip_onnx/<model> "
        "for another of its models, or a local folder holding model_feat.onnx, model_metrics.onnx and "
        "metrics.json.",
        help_ja="score_with=ccip で使う CCIP モデル。Hub の deepghs/ccip_onnx（既定モデル）、"
                "deepghs/ccip_onnx/<モデル名>、または model_feat.onnx・model_metrics.onnx・metrics.json を"
                "置いたローカルフォルダ。", learns=False)
    flexibility_tolerance: float = setting(
        0.01, "Test Prompts", "Flexibility Tolerance",
        "The recommended checkpoint is the most faithful one whose CLIP-T is within this of the best.",
        help_ja="おすすめのチェックポイントは、汎用性のスコア（CLIP-T）が最高値からこの差以内のものの中で、"
                "最も再現度の高いものです。", minimum=0, learns=False)

    def __post_init__(self):
        problems = [p for f in dataclasses.fields(self) for p in _type_problems(f, getattr(self, f.name))]
        if not problems:
            problems = _value_problems(self)
        if problems:
            raise ConfigError("Invalid dbnb config:\n  - " + "\n  - ".join(problems))

    # --- facts derived from the settings --------------------------------------------------------
    @property
    def fine_tunes_text_encoder(self) -> bool:
        """The whole text encoder learns (train_text_encoder, which a LoRA run does not use)."""
        return self.train_text_encoder and not self.use_lora

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder learns: fine-tuned whole, or through LoRA adapters."""
        return self.lora_text_encoder_rank > 0 if self.use_lora else self.train_text_encoder

    @property
    def learning_rate_settings(self) -> tuple[str, ...]:
        """The names of the learning rates this run trains with: UNet first, then the text encoder's."""
        unet, text = (("lora_learning_rate", "lora_text_encoder_learning_rate") if self.use_lora
                      else ("learning_rate", "text_encoder_lr"))
        return (unet, text) if self.trains_text_encoder else (unet,)

    # --- views -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
        return path


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Keys a run folder adds to its config.json beside the settings (dbnb.run.checkpoints writes
# them). Reading a config file drops them, so a run's config.json can start another run.
RUN_KEYS = ("run_id", "dbnb_version")

# The seed guide's character setup: what its Person button and its walkthrough fill in, with the
# values its readers then type (Train Model → Person; Instance prompt "nanU Unan", Class Prompt "Unan";
# transparent class images, 10x the pictures; LR 0.000001; warmup 15; polynomial; flip off; 12 GB
# memory savers). The one source of "the guide's setup": `--preset person` on the command line,
# `dbnb config --preset person`, the training report's comparison, and the notebooks' parameter
# defaults (a test holds each notebook's parameters cell to it). A preset is data: it never depends
# on what this machine has installed. README "From the guide to dbnb" says where dbnb differs.
GUIDE_CHARACTER = {
    # Prompts: a rare name and its reversal (the guide's "nanU Unan"), never a word users type anyway.
    "instance_token": "nanU", "class_token": "Unan", "instance_prompt": "nanU Unan", "class_prompt": "Unan",
    # Class images: fully transparent, 10x the instance pictures (num_class_images 0 means that).
    "with_prior_preservation": True, "class_images_mode": "transparent", "num_class_images": 0,
    "class_data_dir": "class_images", "class_guidance_scale": 12.0, "class_infer_steps": 28,
    "class_negative_prompt": QUALITY_NEGATIVE,
    # Intervals and learning rate.
    "max_train_steps": 3000, "save_every_steps": 500, "sample_every_steps": 0,
    "learning_rate": 1e-6, "lr_scheduler": "polynomial", "lr_warmup_steps": 15, "train_text_encoder": True,
    # Image processing and the 12 GB card's memory savers.
    "resolution": 512, "center_crop": False, "hflip": False,
    "mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True, "use_ema": False,
}

# The guide's two presets (the extension's "Person" and "Object/Style" buttons).
PRESETS = {
    "person": dict(GUIDE_CHARACTER),
    "object_style": {"learning_rate": 2e-6, "hflip": True, "with_prior_preservation": False,
                     "remove_background": False, "prune_core_tags": False},
}


def _type_problems(f: dataclasses.Field, value) -> list[str]:
    kind = _field_type(f)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, tuple) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        want = {tuple: "a list of strings"}.get(kind, kind.__name__)
        return [f"{f.name}: expected {want}, got {value!r} ({type(value).__name__})."]
    choices = f.metadata["choices"]
    if choices and value not in choices:
        return [f"{f.name}: {value!r} is not one of {', '.join(choices)}."]
    return []


def _limit_problems(c: Config) -> list[str]:
    """Each field's own `minimum` / `above`."""
    p = []
    for f in FIELDS.values():
        value, low, above = getattr(c, f.name), f.metadata["minimum"], f.metadata["above"]
        if low is not None and value < low:
            p.append(f"{f.name}: {value} must " + ("not be negative" if low == 0 else f"be at least {low}")
                     + f" (default {f.default}).")
        if above is not None and value <= above:
            p.append(f"{f.name}: {value} must be > {above} (default {f.default}).")
        if f.metadata["maximum"] is not None and value > f.metadata["maximum"]:
            p.append(f"{f.name}: {value} must be at most {f.metadata['maximum']} (default {f.default}).")
    return p


def _value_problems(c: Config) -> list[str]:
    p = _limit_problems(c)
    if c.resolution <= 0 or c.resolution % 8:
        p.append(f"resolution: {c.resolution} must be a positive multiple of 8 (SD 1.x: 512).")
    if c.max_train_steps <= 0 and c.num_train_epochs <= 0:
        p.append(f"max_train_steps: {c.max_train_steps} must be > 0 (or set num_train_epochs > 0).")
    p += _lora_problems(c)
    p += _inbackward_problems(c)
    p += _optimizer_problems(c)
    if not 0.0 < c.ema_decay < 1.0:
        p.append(f"ema_decay: {c.ema_decay} must be between 0 and 1 (e.g. 0.9999).")
    if c.with_prior_preservation and not c.concepts_list:
        if not c.class_prompt:
            p.append("with_prior_preservation is on but class_prompt is empty: set class_prompt "
                     "(the guide: a throwaway word such as 'Unan', the reversal of the instance token 'nanU') "
                     "or turn with_prior_preservation off.")
        if not c.class_data_dir:
            p.append("with_prior_preservation is on but class_data_dir is empty: set the class image "
                     "folder or turn with_prior_preservation off.")
        if c.num_class_images < 1 and c.class_images_mode not in BLANK_CLASS_IMAGES:
            p.append(f"with_prior_preservation is on but num_class_images is 0 (only class_images_mode="
                     f"transparent / black take 0 as 10x the instance images): set how many class images to use "
                     f"(the seed: 10x the instance images).")
    if not c.pretrained_model_name_or_path:
        p.append("pretrained_model_name_or_path is empty: name the base model (folder, repo id, file or URL).")
    if not c.run_name.strip() or c.run_name.strip() in (".", "..") or any(ch in c.run_name for ch in "/\\"):
        p.append(f"run_name: {c.run_name!r} must be a plain folder name (no '/', '..' or absolute path; not "
                 "empty): the run folder is output_dir/run_name, so put the path in output_dir.")
    for name in ("instance_prompt", "class_prompt", "instance_token", "class_token"):
        value = getattr(c, name)
        if value and not value.strip():
            p.append(f"{name}: {value!r} is only spaces; set the words (or leave it empty).")
    return p + _link_problems(c)


# Folders dbnb reads or writes in place, which a link cannot be, and the setting that takes the
# link instead (a link here would otherwise become a local folder named "https:").
_FOLDER_NOT_LINK = {
    "instance_data_dir": "set dataset_source to the link and prepare the pictures into instance_data_dir "
                         "(notebook 02; CLI: dbnb prep LINK FOLDER)",
    "class_data_dir": "set class_images_mode=import and class_images_import to the link, which copies the "
                      "pictures into class_data_dir (notebook 03; CLI: dbnb classimages)",
    "output_dir": "set a folder on this machine (on Colab, one in Drive: /content/drive/MyDrive/...)",
}


def _link_problems(c: Config) -> list[str]:
    return [f"{name}: {getattr(c, name)!r} is a link, but it must be a folder on this machine: {fix}."
            for name, fix in _FOLDER_NOT_LINK.items()
            if getattr(c, name).strip().lower().startswith(("http://", "https://"))]


# class_images_mode values whose pictures are blank (one colour): they teach the class word "a plain
# picture", so it must be a word nobody prompts with (`class_word_warning`).
BLANK_CLASS_IMAGES = ("transparent", "black")
# Words people put in their prompts anyway (booru tags and plain English): as the class word of blank
# class images they would come to mean a plain picture. Compared per tag / word, lower case.
COMMON_CLASS_WORDS = frozenset({
    "girl", "1girl", "2girls", "multiple girls", "boy", "1boy", "2boys", "woman", "man", "person", "people",
    "human", "character", "female", "male", "lady", "child", "kid", "solo", "anime", "a girl", "a boy",
    "a woman", "a man", "a person", "a character", "1other"})


def class_word_warning(c: Config) -> str:
    """A warning (empty when none) for a common word as the class prompt of blank class images with
    prior preservation: the guide's "ここを仮にgirlにした場合、ふとgirlを使用したい場面が出た時に困ってしまう"
    — the run teaches that word to draw a plain picture. Checked at train start (not a ConfigError:
    someone may want exactly that)."""
    if not c.with_prior_preservation or c.class_images_mode not in BLANK_CLASS_IMAGES or c.concepts_list:
        return ""
    tags = [t.strip().strip("()[]{}").split(":")[0].strip().lower() for t in c.class_prompt.split(",")]
    common = [t for t in tags if t in COMMON_CLASS_WORDS or set(t.split()) & COMMON_CLASS_WORDS]
    if not common:
        return ""
    colour = "plain black" if c.class_images_mode == "black" else f"plain {c.background_color}"
    return (f"class_prompt {c.class_prompt!r} with class_images_mode={c.class_images_mode} and prior preservation: "
            f"the run teaches {', '.join(repr(t) for t in common)} to draw a {colour} picture, and every prompt "
            f"that uses it (the test prompts' '1girl, solo' too) is pulled towards that. The guide uses a throwaway "
            f"word instead: class_prompt=Unan with instance_prompt='nanU Unan' (a rare name and its reversal; in the "
            f"notebooks: class_token in 02). Set class_prompt (and instance_prompt) to such a word, or "
            f"class_images_mode=generate for real class pictures of {common[0]!r}. / クラスプロンプト "
            f"{c.class_prompt!r} が透過（無地）の正則化画像で学習され、{common[0]!r} が無地の絵を意味するようになります。"
            f"ガイドのように意味のない単語（例: nanU Unan の Unan）にしてください。")


def schedule_problems(c: Config, steps: int) -> tuple[list[str], list[str]]:
    """The LR schedule's settings checked together against the run's `steps`: (problems that
    would stop the run, ones that would only make it other than set), one line each with the fix.
    diffusers' schedules meet the first kind only at the last step (a division by zero), so the
    trainer checks before the first. Not part of a Config's own validation: a finished run's
    config must stay readable (export, sample) whatever it says."""
    fatal, odd = [], []
    said = (f"the run's {steps} steps (num_train_epochs={c.num_train_epochs})" if c.num_train_epochs > 0
            else f"max_train_steps={steps}")
    after_warmup = steps - c.lr_warmup_steps
    fix = f"Lower lr_warmup_steps below {steps} (a tenth of the run is usual) or train for more steps."
    if c.lr_scheduler == "polynomial" and after_warmup == 0:
        fatal.append(f"lr_warmup_steps={c.lr_warmup_steps} equals {said}: lr_scheduler=polynomial divides by the "
                     f"steps after the warm-up, none here, and the run would stop at its last step. {fix}")
    elif c.lr_scheduler != "constant" and after_warmup <= 0:
        odd.append(f"lr_warmup_steps={c.lr_warmup_steps} is not below {said}: the learning rate is still rising "
                   f"when the run ends and never reaches the one set. {fix}")
    elif c.lr_scheduler == "cosine_with_restarts" and c.lr_num_cycles > after_warmup:
        odd.append(f"lr_num_cycles={c.lr_num_cycles} with {after_warmup} steps after the warm-up "
                   f"(lr_warmup_steps={c.lr_warmup_steps}, {said}): a restart would come more often than once a "
                   f"step. Use at most {after_warmup} cycles (the extension's default: 1).")
    if c.lr_scheduler == "polynomial" and c.lr_power <= 0:
        fatal.append(f"lr_power={c.lr_power:g} with lr_scheduler=polynomial: the power must be > 0 (1.0: a straight "
                     "decay). 0 would keep the LR constant (use lr_scheduler=constant for that), a negative power "
                     "raises it without bound and divides by zero at the last step.")
    return fatal, odd


def check_schedule(c: Config, steps: int) -> None:
    """Before the first step: a ConfigError naming the settings for a schedule that would stop
    the run, a warning for one that would run other than set (see schedule_problems)."""
    fatal, odd = schedule_problems(c, steps)
    if fatal:
        raise ConfigError("The learning-rate schedule cannot run to the end:\n  - " + "\n  - ".join(fatal))
    for line in odd:
        warnings.warn(line, stacklevel=2)


# What optimizer_in_backward (dbnb.train.inbackward) cannot combine with, why, and what to change: it
# steps each weight inside backward, and these need every gradient after backward.
_INBACKWARD_WHY = {
    "gradient_accumulation_steps": (
        "gradients are consumed (stepped and freed) as backward produces them, so there is nothing "
        "to accumulate the next micro-batch into. Set gradient_accumulation_steps=1 (raise "
        "train_batch_size instead)"),
    "max_grad_norm": (
        "clipping by the global gradient norm needs every gradient at once, but the first weights are "
        "already stepped before the last gradients exist. Set max_grad_norm=0"),
    "mixed_precision": (
        "fp16 training needs the GradScaler, which unscales the gradients and skips the step on "
        "inf/NaN only after the whole backward; here every weight has already been stepped with "
        "its still-scaled gradient by then. Use mixed_precision=bf16 (A100, H100, L4, RTX 30xx+) "
        "or mixed_precision=no"),
}


def inbackward_conflicts(c: Config) -> list[str]:
    """One line per setting that optimizer_in_backward cannot honour (whether or not it is on)."""
    found = []
    if c.gradient_accumulation_steps > 1:
        found.append(f"gradient_accumulation_steps={c.gradient_accumulation_steps}: "
                     f"{_INBACKWARD_WHY['gradient_accumulation_steps']}.")
    if c.max_grad_norm > 0:
        found.append(f"max_grad_norm={c.max_grad_norm:g}: {_INBACKWARD_WHY['max_grad_norm']}.")
    # memory_profile=auto picks the precision at training; dbnb.train.memory refuses fp16 there
    if c.mixed_precision == "fp16" and c.memory_profile == "manual":
        found.append(f"mixed_precision=fp16: {_INBACKWARD_WHY['mixed_precision']}.")
    return found


def _inbackward_problems(c: Config) -> list[str]:
    if not c.optimizer_in_backward or not (found := inbackward_conflicts(c)):
        return []
    return ["optimizer_in_backward=true cannot be used with:\n    - " + "\n    - ".join(found)
            + "\n    Change these, or set optimizer_in_backward=false."]


def _lora_problems(c: Config) -> list[str]:
    p = []
    if not 0.0 <= c.lora_dropout < 1.0:
        p.append(f"lora_dropout: {c.lora_dropout} is a probability below 1; use 0 to 0.5 (0: off).")
    if not c.use_lora:
        return p
    if c.lora_rank < 1:
        p.append(f"lora_rank: {c.lora_rank} must be at least 1 with use_lora (the seed-style default is 32).")
    if c.optimizer_in_backward:
        p.append("use_lora with optimizer_in_backward: that saves the full UNet's gradients, which LoRA does not "
                 "have; set optimizer_in_backward=false.")
    return p


def _optimizer_problems(c: Config) -> list[str]:
    p = []
    if c.optimizer == "adamw8bit" and not c.use_8bit_adam:
        p.append("optimizer=adamw8bit with use_8bit_adam=false: the two disagree. For 8-bit AdamW set "
                 "use_8bit_adam=true (or optimizer=adamw, which follows use_8bit_adam); for torch's AdamW set "
                 "optimizer=adamw.")
    if c.optimizer == "prodigy":
        # Prodigy estimates the step size; its lr multiplies that estimate. AdamW-sized rates
        # (1e-4 … 1e-6) would leave the model where it started.
        low = [f"{name}={getattr(c, name):g}" for name in c.learning_rate_settings if getattr(c, name) < 0.1]
        if low:
            p.append(f"optimizer=prodigy with {', '.join(low)}: Prodigy finds its own step size and its "
                     "learning rate multiplies it; set " + " and ".join(f"{n.split('=')[0]}=1.0" for n in low)
                     + " (0.5 for a gentler run).")
        if c.optimizer_in_backward:
            p.append("optimizer=prodigy with optimizer_in_backward: Prodigy estimates one step size from all "
                     "weights together, which per-weight stepping cannot do; set optimizer_in_backward=false.")
    return p


def _field_type(f: dataclasses.Field) -> type:
    hint = _hints()[f.name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@functools.cache
def _hints() -> dict:
    # get_type_hints re-evaluates every annotation; once is enough (the form validates per keystroke).
    return typing.get_type_hints(Config)


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from plain data (JSON / YAML). Unknown keys are an error, not ignored."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"Unknown setting(s) in {source}: {', '.join(hints)}. "
                          "`dbnb config --list` shows every setting.")
    return Config(**{k: _normalize(_field_type(FIELDS[k]), v) for k, v in data.items()})


def _normalize(kind: type, value):
    """The few lossless readings JSON / YAML need; anything else is left for validation."""
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    if kind is tuple and isinstance(value, str):
        return (value,)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # PyYAML reads 1e-6 (no dot) as a string
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from the command line, the value read as YAML (so 1e-6, true, [a, b] work)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Override {text!r} is not key=value (e.g. learning_rate=1e-6).")
    if key not in FIELDS:
        from_dict({key: None}, source="the command line")  # raises with a suggestion
    kind = _field_type(FIELDS[key])
    if kind is str:
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read {raw!r} ({e}).") from None
    return key, _normalize(kind, value)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                preset: str | None = None) -> Config:
    """Defaults ← preset ← file ← `key=value` overrides, validated once at the end."""
    data: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        data.update(PRESETS[preset])
    if path:
        data.update(read_config_file(path))
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    return from_dict(data, source=str(path) if path else "config")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. `dbnb config --preset person > {path.name}` writes one.")
    text = path.read_text(encoding="utf-8")
    try:
        # JSON only for .json: any other name is read as YAML, which reads JSON too, so a file an
        # editor or a download renamed (my.yaml.txt, config.yml.yaml) still reads as it is.
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 — parser errors differ by format; the message says which file
        raise ConfigError(f"Cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of setting: value, not {type(data).__name__}.")
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def owner(name: str) -> str:
    """The notebook step whose parameters cell sets this setting."""
    return FIELDS[name].metadata["step"]


def step_fields(step: str) -> list[str]:
    """The settings one notebook step owns, in order."""
    assert step in STEPS, step
    return [name for name in FIELDS if owner(name) == step]


def section_fields(section: str) -> list[str]:
    """The settings of one section, in order (for a notebook that handles one step)."""
    assert section in SECTIONS, section
    return [f.name for f in dataclasses.fields(Config) if f.metadata["section"] == section]


def as_overrides(config: Config, names: typing.Iterable[str]) -> list[str]:
    """`key=value` strings that `load_config(..., overrides)` reads back to these values."""
    out = []
    for name in names:
        value = getattr(config, name)
        text = value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
        out.append(f"{name}={text}")
    return out


def describe() -> list[dict]:
    """One row per setting, in order: for forms, `#@param` cells and the README table."""
    return [dict(name=f.name, default=f.default, type=_field_type(f).__name__, **f.metadata)
            for f in dataclasses.fields(Config)]
