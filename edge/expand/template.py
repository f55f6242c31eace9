"""The template expander: Qwen-Image's prompt-rewriting rules, applied without a model.

Qwen-Image's rewriter (an LLM with a system prompt) is told to keep the user's intent, add plausible detail
to short inputs (subject, style, composition, lighting), put any text to be rendered in quotes exactly as
written, pick a fitting style (realistic photography when nothing says otherwise), stay under 200 words and
answer in the input's language; its outputs end in a quality phrase ("Ultra HD, 4K, cinematic composition").
This module applies the same rules mechanically: it never drops or rewords a word of the prompt, it only
normalises punctuation, quotes text to render and appends what is missing, chosen by the seed.

Prompts of the embedded default's world (every word in :mod:`qwen_edge.world`'s grammar) take another path
(:mod:`.world_fill`): the unsaid attributes are filled in that grammar, since the default model knows nothing
of photography or lighting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import world_fill
from .base import Expansion, check_prompt, check_seed, is_chinese

MAX_WORDS = 200  # the rewriter's own bound (words in English, characters in Chinese)
ASPECTS = ("style", "composition", "lighting")


@dataclass(frozen=True)
class _Language:
    """What the rules need per language: how to spot an aspect, what to add, how to quote and join."""

    keywords: dict  # aspect (+ "quality", "typography") -> words whose presence means "already said"
    options: dict  # aspect -> phrases to add when absent, picked by the seed
    quality: str
    text_detail: str  # with {text}: said when the prompt has text to render and no lettering style
    quotes: tuple[str, str]
    and_: str  # joins several quoted texts
    cue: re.Pattern  # unquoted text to render after a cue ("a sign saying hello")
    end: str  # the sentence end to add

    def mentions(self, text: str, aspect: str) -> bool:
        return any(_has(text, w) for w in self.keywords[aspect])

    def join(self, text: str, phrase: str) -> str:
        if self.end == "。":
            return f"{text}{phrase}。"
        return f"{text} {phrase[0].upper()}{phrase[1:]}."


def _has(text: str, word: str) -> bool:
    if not word.isascii():  # Chinese has no word boundaries
        return word in text
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text, re.IGNORECASE) is not None


# Text after a cue runs to the next punctuation, or to a new clause ("... and a dog", "... on a wall").
_EN_CUE = re.compile(
    r"\b(?:says|saying|that reads|which reads|with the (?:text|words?|caption)|the (?:text|words?)|titled|"
    r"entitled|labell?ed|inscribed with)\s+(?![\"“「『])"
    r"(.+?)(?=\s*[,.;:!?\"“”]|\s+(?:and|with|on|in|at|next to|under|above|below|beside|behind|near)\s+"
    r"(?:a|an|the)\b|$)", re.IGNORECASE)
_ZH_CUE = re.compile(r"(?:写着|写有|上书|题为|标题为|标有|印着|印有|文字为|字样为)[:：]?\s*(?![“\"「『])"
                     r"([^，。,.；;：:！!？?“”\"的]+)")  # "写着X的牌子": the text ends before 的

ENGLISH = _Language(
    keywords={
        "style": ("photo", "photograph", "photography", "photographic", "photorealistic", "realistic", "painting",
                  "painted", "oil", "watercolor", "watercolour", "illustration", "illustrated", "drawing", "drawn",
                  "sketch", "anime", "manga", "cartoon", "comic", "render", "rendered", "rendering", "3d", "cgi",
                  "pixel art", "vector", "style", "artwork", "poster", "cinematic", "film still", "ink", "pencil",
                  "charcoal", "digital art", "minimalist", "vintage", "retro", "surreal", "impressionist", "logo",
                  "icon"),
        "composition": ("close-up", "closeup", "close up", "portrait", "shot", "angle", "view", "composition",
                        "composed", "framing", "framed", "centered", "centred", "foreground", "aerial", "macro",
                        "panorama", "panoramic", "top-down", "overhead", "symmetrical", "rule of thirds", "bokeh",
                        "depth of field", "wide-angle", "perspective"),
        "lighting": ("light", "lights", "lit", "lighting", "sunlight", "sunlit", "sunny", "sunset", "sunrise",
                     "dusk", "dawn", "twilight", "golden hour", "glow", "glowing", "shadow", "shadows", "neon",
                     "candlelight", "candlelit", "moonlight", "moonlit", "backlit", "illuminated", "night", "dark",
                     "bright", "overcast", "foggy", "shade"),
        "quality": ("4k", "8k", "hd", "uhd", "high resolution", "high-resolution", "ultra", "masterpiece"),
        "typography": ("font", "typeface", "lettering", "letters", "calligraphy", "handwritten", "handwriting"),
    },
    options={
        "style": ("realistic photography style with natural colours and fine detail",
                  "detailed digital illustration with clean lines and rich colour",
                  "cinematic film still with a shallow depth of field"),
        "composition": ("the subject is centred in a balanced composition against an uncluttered background",
                        "medium shot at eye level, the subject filling the centre of the frame",
                        "wide shot following the rule of thirds, the subject in the foreground"),
        "lighting": ("soft natural daylight with gentle shadows",
                     "warm golden-hour side light with long, soft shadows",
                     "even, diffuse studio lighting with soft shadows"),
    },
    quality="Ultra HD, 4K, cinematic composition",
    text_detail="lettering {text} exactly as written, clear and legible, prominently placed",
    quotes=('"', '"'),
    and_=" and ",
    cue=_EN_CUE,
    end=".",
)

CHINESE = _Language(
    keywords={
        "style": ("风格", "摄影", "照片", "写实", "插画", "油画", "水彩", "国画", "水墨", "动漫", "漫画", "卡通",
                  "素描", "渲染", "海报", "像素", "3D", "标志", "图标"),
        "composition": ("构图", "特写", "远景", "近景", "中景", "全景", "俯视", "仰视", "俯拍", "视角", "镜头",
                        "居中", "前景"),
        "lighting": ("光线", "灯光", "光照", "阳光", "月光", "逆光", "烛光", "夕阳", "黄昏", "阴影", "夜晚", "夜景",
                     "霓虹"),
        "quality": ("4K", "8K", "超清", "高清"),
        "typography": ("字体", "书法", "手写"),
    },
    options={
        "style": ("写实摄影风格，色彩自然，细节丰富", "精致的数字插画风格，线条干净，色彩饱满", "电影剧照质感，浅景深"),
        "composition": ("主体居中，构图平衡，背景简洁", "平视中景，主体占据画面中央", "广角镜头，三分法构图，主体位于前景"),
        "lighting": ("柔和的自然光，阴影细腻", "温暖的侧向夕阳光，投下柔和的长影", "均匀柔和的影棚灯光"),
    },
    quality="超清，4K，电影级构图",
    text_detail="文字{text}按原文准确呈现，字体清晰醒目，位置显眼",
    quotes=("“", "”"),
    and_="和",
    cue=_ZH_CUE,
    end="。",
)

# Quotes a user may already have used, normalised to the language's own pair.
# Single quotes are left alone: in English they are as often scare quotes or apostrophes.
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|「([^」]+)」|『([^』]+)』")


def word_count(text: str) -> int:
    """Words for the 200-word bound: each Chinese character counts as one, like the rewriter's 200 字."""
    cjk = re.findall(r"[\u4e00-\u9fff]", text)
    return len(cjk) + len(re.sub(r"[\u4e00-\u9fff]", " ", text).split())


def is_world_prompt(prompt: str) -> bool:
    """True when every word of ``prompt`` belongs to the embedded default's world grammar."""
    return world_fill.world_spec(check_prompt(prompt)) is not None


class TemplateExpander:
    """Deterministic, offline prompt expansion (see the module docstring for the rules).

    ``world=False`` never treats a prompt as one of the embedded default's world.

    Example: ``TemplateExpander()("a cat", seed=0).text`` is "A cat. Cinematic film still with a shallow
    depth of field. Medium shot at eye level, the subject filling the centre of the frame. Warm
    golden-hour side light with long, soft shadows. Ultra HD, 4K, cinematic composition."
    """

    def __init__(self, *, world: bool = True, max_words: int = MAX_WORDS):
        self.world = world
        self.max_words = max_words

    def __call__(self, prompt: str, *, seed: int = 0) -> Expansion:
        text, seed = check_prompt(prompt), check_seed(seed)
        spec = world_fill.world_spec(text) if self.world else None
        if spec is not None:
            return world_fill.fill(spec, seed)
        return rewrite(text, seed, self.max_words)


def rewrite(text: str, seed: int, max_words: int = MAX_WORDS) -> Expansion:
    """The open-domain rules: normalise, quote text to render, add the missing aspects within the bound."""
    lang = CHINESE if is_chinese(text) else ENGLISH
    body, quoted = _quote(_normalise(text, lang), lang)
    notes = [f"{'Chinese' if lang is CHINESE else 'English'} prompt"]
    if word_count(body) > max_words:
        return Expansion(body, (*notes, f"already {word_count(body)} words, over {max_words}: nothing added"))
    rng = np.random.default_rng(seed)
    picks = {a: int(rng.integers(len(lang.options[a]))) for a in ASPECTS}  # drawn always: stable per seed
    additions = []  # (what, phrase) in the order the rewriter's examples give them
    if quoted and not lang.mentions(body, "typography"):
        additions.append(("lettering", lang.text_detail.format(text=lang.and_.join(quoted))))
    additions += [(a, lang.options[a][picks[a]]) for a in ASPECTS if not lang.mentions(body, a)]
    if not lang.mentions(body, "quality"):
        additions.append(("quality", lang.quality))
    out, added = body, []
    for what, phrase in additions:
        longer = lang.join(out, phrase)
        if word_count(longer) > max_words:
            notes.append(f"stopped adding detail at the {max_words}-word bound")
            break
        out = longer
        added.append(what)
    notes.append(f"added {', '.join(added)}" if added else "nothing to add")
    return Expansion(out, tuple(notes))


def _normalise(text: str, lang: _Language) -> str:
    """One line, single spaces, a capital first letter, and a sentence end."""
    text = re.sub(r"\s+", " ", text).strip()
    text = text.rstrip(",;:，；：、 ")
    if lang is ENGLISH and text[:1].islower():
        text = text[0].upper() + text[1:]
    if not text.rstrip("\"”」』").endswith((".", "!", "?", "。", "！", "？")):  # 'a sign "hi."' already ends
        text += lang.end
    return text


def _quote(text: str, lang: _Language) -> tuple[str, list[str]]:
    """Normalise existing quotes and quote unquoted text after a cue; returns the text and what is quoted."""
    found: list[str] = []
    open_q, close_q = lang.quotes

    def requote(m: re.Match) -> str:
        inner = next(g for g in m.groups() if g is not None)
        found.append(f"{open_q}{inner}{close_q}")
        return found[-1]

    text = _QUOTED.sub(requote, text)

    def cue(m: re.Match) -> str:
        inner = m.group(1).strip()
        if not inner:
            return m.group(0)
        found.append(f"{open_q}{inner}{close_q}")
        start, end = m.span(1)
        whole = m.group(0)
        return whole[: start - m.start()] + found[-1] + whole[end - m.start():]

    return lang.cue.sub(cue, text), found
