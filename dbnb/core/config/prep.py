"""Dataset preparation (`dbnb prep`, notebook 02): how the source pictures become the training set."""
from __future__ import annotations

from dataclasses import dataclass

from dbnb.core.config.declare import setting


@dataclass(frozen=True)
class PrepSettings:
    """What `dbnb prep` reads to turn the source pictures into instance_data_dir (step dataset). Training
    reads the prepared pictures, not these, so a run does not freeze them: a resume may change them."""

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
                               "advice). center: center crop. face: crop around the detected face. keep: not squared: "
                               "each picture keeps its shape, resized to its aspect bucket (about resolution x "
                               "resolution pixels, never enlarged), for bucketing=true, which it needs.",
                               choices=("pad", "center", "face", "keep"),
                               help_ja="正方形にする方法。pad: "
                                       "切り取らずに background_color の余白を足して正方形にします（ガイドのおすすめ。"
                                       "まっすぐ切り取った跡が学習されません）。center: 中央を正方形に切り抜きます。"
                                       "face: 検出した顔を中心に切り抜きます。keep: 正方形にせず、形を保ったまま"
                                       "バケットの大きさ（約 resolution × resolution ピクセル、拡大はしません）に縮小します。"
                                       "bucketing=true 用で、bucketing がオンでないと使えません。", learns=False)
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
