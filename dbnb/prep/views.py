"""The guide's advice on which pictures to use (選んではいけない画像), per picture and for the set.

The guide: face close-ups and views from behind get in the way (its 花月 test: wide outputs broke,
back views turned up unasked); a lone side view is better left out, several (left and right)
are fine; a body-only or cut-off picture is 絶対にNG. For the set: full body 3 : from the chest
up 2, 5–10 pictures.

With caption_mode=tags the WD14 tags of the picture as given (its first output, not prep's own
crops) tell the view. Without tags only the face tells anything: its share gives close-ups, and
no face found where a detector ran may be a back view or a cut-off head (said as a question).
Side views are told by tags only.
"""
from __future__ import annotations

from collections import Counter

# WD14 tag names (selected_tags.csv spelling) for each view the guide names.
CLOSE_UP_TAGS = frozenset({"close-up", "portrait"})
BEHIND_TAGS = frozenset({"from_behind"})
SIDE_TAGS = frozenset({"from_side", "profile"})
CUT_OFF_TAGS = frozenset({"head_out_of_frame", "lower_body"})
# A framing from tags, for pictures whose face was not found (or with no detector installed).
FRAMING_BY_TAG = {"full_body": "full body", "cowboy_shot": "bust", "upper_body": "bust",
                  "portrait": "face", "close-up": "face"}

# key: (short name for lists, the guide's reason in English / in Japanese)
VIEWS = {
    "close-up": ("face close-up",
                 "the guide says close-ups are learnt so strongly they get in the way (in its 花月 test wide pictures "
                 "broke); use one that shows down to the chest",
                 "顔のドアップです。強く覚えてしまい特定の場面で邪魔になりやすい（ガイドの花月の例では横長の出力が"
                 "崩れた）ので、胸のあたりまで写っている画像にしてください"),
    "behind": ("view from behind",
               "the guide says back views get in the way (in its 花月 test back views turned up unasked); remove it",
               "真後ろからの画像です。特定の場面で邪魔になりやすい（ガイドの花月の例では唐突に背面の絵が混じった）"
               "ので、外してください"),
    "lone side": ("the only side view",
                  "the guide says one side view alone is better left out ('from side' may keep giving that same "
                  "picture); remove it, or add more side views, left and right",
                  "横からの画像がこの1枚だけです。1枚だけならいっそ抜いた方がよい（from side で同じような画像ばかり"
                  "出るおそれ）ので、外すか、左右の横顔を何枚か足してください"),
    "cut off": ("body only / cut off",
                "the guide says a body-only or cut-off picture (head out of frame) is learnt strongly and is never "
                "OK (絶対にNG); remove it",
                "体だけ・見切れている画像（頭が画面の外）です。強烈に覚えてしまうので絶対にNG（ガイドより）。"
                "外してください"),
    "no face": ("no face found",
                "if it is a view from behind or the head is out of frame, the guide says remove it "
                "(caption_mode=tags tells which); if the face shows, ignore this",
                "顔が見つかりません。真後ろからの画像や頭が見切れた画像なら外してください（caption_mode=tags なら"
                "判別できます）。顔が写っていれば問題ありません"),
}
GUIDE_FULL, GUIDE_BUST = 3, 2            # the guide's full body : from the chest up
GUIDE_COUNT = (5, 10)                    # the guide's recommended number of pictures
FULL_SHARE = (0.4, 0.8)                  # full-body share outside this is told (3 : 2 is 0.6)


def flag(key: str) -> str:
    name, english, japanese = VIEWS[key]
    return f"{name}: {english} / {japanese}"


def given_tags(row) -> set[str] | None:
    """The tags of the picture as the user gave it (the square; crops come after), or None
    when the set was not tagged."""
    first = next(iter(row.outputs), None)
    return set(row.tags[first]) if first is not None and first in row.tags else None


def views_of(row, detector: bool) -> list[str]:
    """The VIEWS keys of one picture, side views as "side" (the set decides if it is alone)."""
    tags = given_tags(row)
    keys = ["close-up"] if row.framing == "face" or (tags and tags & CLOSE_UP_TAGS) else []
    if tags is None:
        return keys + (["no face"] if detector and row.framing == "unknown" else [])
    keys += ["behind"] if tags & BEHIND_TAGS else []
    keys += ["side"] if tags & SIDE_TAGS else []
    keys += ["cut off"] if tags & CUT_OFF_TAGS else []
    return keys


def flag_pictures(rows, detector: bool) -> None:
    """Set each usable row's `guide` flags (made afresh every run: tags and detector may change)."""
    usable = [r for r in rows if r.usable]
    views = {r.source: views_of(r, detector) for r in usable}
    sides = [s for s, keys in views.items() if "side" in keys]
    for row in rows:
        keys = [("lone side" if len(sides) == 1 else "") if k == "side" else k for k in views.get(row.source, [])]
        row.guide = [flag(k) for k in keys if k]


def framing_counts(rows) -> Counter:
    """Training pictures per framing (crops included: the trainer sees them), a face-less
    picture's framing read from its tags where it has them."""
    counts = Counter()
    for row in rows:
        if not row.usable:
            continue
        for name, framing in row.outputs.items():
            framing = "bust" if framing == "cowboy" else framing
            if framing == "unknown":
                tags = row.tags.get(name, {})
                framing = next((FRAMING_BY_TAG[t] for t in tags if t in FRAMING_BY_TAG), "unknown")
            counts[framing] += 1
    return counts


def balance_line(counts: Counter) -> str:
    full, bust, face, unknown = (counts[k] for k in ("full body", "bust", "face", "unknown"))
    n = sum(counts.values())
    if not n:
        return ""
    extra = ", ".join(p for p in (f"{face} close-up(s)" if face else "", f"{unknown} not told" if unknown else "") if p)
    extra_ja = "、".join(p for p in (f"ドアップ {face}" if face else "", f"不明 {unknown}" if unknown else "") if p)
    return (f"full body : bust-up = {full} : {bust}" + (f" ({extra})" if extra else "") + f" in {n} pictures; "
            f"the guide: about {GUIDE_FULL} : {GUIDE_BUST}, {GUIDE_COUNT[0]}–{GUIDE_COUNT[1]} pictures / "
            f"全身 {full} : バストアップ {bust}" + (f"（{extra_ja}）" if extra_ja else "") + f"、計 {n} 枚。"
            f"ガイドの目安は 全身{GUIDE_FULL} : 胸から上{GUIDE_BUST}、{GUIDE_COUNT[0]}〜{GUIDE_COUNT[1]} 枚")


def balance_advice(counts: Counter, minimum: int) -> list[str]:
    """The set against the guide's 3 : 2 and 5–10 pictures (fewer than `minimum` is said elsewhere)."""
    out = []
    full, bust, n = counts["full body"], counts["bust"], sum(counts.values())
    if full + bust >= 2 and full / (full + bust) < FULL_SHARE[0]:
        out.append(f"fewer full-body pictures than the guide's {GUIDE_FULL} : {GUIDE_BUST} (here {full} : {bust}): "
                   f"add full-body pictures / 全身の画像がガイドの目安（全身{GUIDE_FULL} : 胸から上{GUIDE_BUST}）より"
                   f"少なめです（今回 {full} : {bust}）。全身の画像を足してください")
    elif full + bust >= 2 and full / (full + bust) > FULL_SHARE[1]:
        out.append(f"fewer bust-ups than the guide's {GUIDE_FULL} : {GUIDE_BUST} (here {full} : {bust}): add "
                   "pictures from the chest up, or set extra_framings=True to crop them from the full-body ones / "
                   f"胸から上の画像がガイドの目安より少なめです（今回 {full} : {bust}）。胸から上の画像を足すか、"
                   "extra_framings=True で全身の画像から切り出してください")
    if minimum <= n < GUIDE_COUNT[0]:
        out.append(f"{n} training pictures: the guide recommends {GUIDE_COUNT[0]}–{GUIDE_COUNT[1]}, good ones "
                   f"(quality first); add a few / 学習画像が {n} 枚です。ガイドのおすすめは {GUIDE_COUNT[0]}〜"
                   f"{GUIDE_COUNT[1]} 枚（とにかく質）。良い画像を数枚足してください")
    return out


def flagged_advice(rows) -> list[str]:
    """One line naming every picture the guide advises against; the reasons are in the report."""
    flagged = [f"{r.source} ({', '.join(g.split(':')[0] for g in r.guide)})" for r in rows if r.usable and r.guide]
    if not flagged:
        return []
    return [f"{len(flagged)} picture(s) the guide advises against: " + "; ".join(flagged[:8])
            + (" …" if len(flagged) > 8 else "") + " (why, and what to do: report.md) / ガイドが避けるよう勧める"
            f"画像が {len(flagged)} 枚あります（理由と対処は report.md）"]
