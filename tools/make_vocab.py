#!/usr/bin/env python
"""Regenerate ``ap_erase_fast/data/vocab_en.txt``, the default preservation vocabulary.

The list is derived only from the CLIP BPE file vendored in ``ap_erase_fast/models/assets``
(MIT licence) and the hand-written filters below, so it is licence-clean and exactly
reproducible: ``python tools/make_vocab.py`` rewrites the file byte for byte;
``python tools/make_vocab.py --check`` exits 1 if the committed file differs.

Selection, in order:
1. whole-word BPE tokens (merges whose result ends in ``</w>``), in merge order, which is
   roughly frequency order in CLIP's training text;
2. lowercase a–z only, at least 3 letters (two-letter tokens are almost all fragments,
   abbreviations or function words);
3. an English word: present in Webster's Second International dictionary (1934, public domain;
   the FreeBSD ``web2`` list as shipped by the MIT-licensed ``english-words`` package, needed
   only to regenerate: ``pip install english-words==2.0.2``), and its consonants before the
   first vowel form an English onset. CLIP's BPE has no word-start marker, so end-of-word
   fragments ("ght", "ation", "ely") are whole-word tokens too; this step removes most of them,
   along with proper names and internet slang (the list is close in spirit to the authors'
   Oxford-3000 list: base forms of common words, no names);
4. not a function word (pronouns, articles, prepositions, conjunctions, auxiliaries, …);
5. not a known sub-word fragment (suffixes such as "ing", "ation", "ers" are also whole-word
   tokens because CLIP's BPE has no word-start marker; listed by hand after review);
6. not a slur, profanity or internet/markup token (``amp``, ``http``, ``lol``, …).
   Ordinary body, nudity and sexuality words ("naked", "nude", "breast", "sexy", "bikini") are
   KEPT on purpose: when the erased concept is "nudity", these are its closest neighbours, and
   Adversarial Preservation needs them as candidates for the preservation set R (the authors'
   Oxford-3000 list contains such words too). Whether to exclude the erased concept itself is
   a separate option of the engine (``exclude_erased``).
The first ``SIZE`` words that pass make the list.
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE = os.path.join(ROOT, "ap_erase_fast", "models", "assets", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "ap_erase_fast", "data", "vocab_en.txt")
SIZE = 3000
NUM_MERGES = 49152 - 256 - 2

ONSETS = set(
    "b c d f g h j k l m n p q r s t v w x y z "
    "bl br ch chr cl cr dr dw fl fr gh gl gn gr kn kr ph phr pl pr ps qu sc sch scr sh shr sk sl sm sn "
    "sp sph spl spr squ st str sw th thr tr tw wh wr".split()
)

STOP_WORDS = set(
    """
    the and for our this you with all are from that your have was will can just here but what about
    not his has like who when how some they come its their way been there other only she these into
    most had than them why did him may would were which also any every could should then while must
    off out over per via yet too very much many more such each both either neither nor own same
    whom whose whose where whether though although because since until unless upon onto within
    without into across along among around against between beyond during except inside outside
    through throughout toward towards under underneath above below behind beside besides near
    himself herself itself myself yourself ourselves themselves yourselves those hers ours yours
    theirs mine shall might does doing done being having gets got getting let lets say says said
    tell told dont didnt doesnt isnt wasnt arent cant wont wouldnt couldnt shouldnt aint ive youre
    theyre thats whats hes shes wasn didn doesn isn aren couldn wouldn shouldn haven hasn hadn
    please thanks thank yes yeah yep nope okay etc also just still even ever never always often
    really again already almost quite rather else anyway somehow sometimes anything everything
    nothing something someone anyone everyone nobody somebody anybody everybody however therefore
    thus hence whereas whatever whenever wherever whoever one ones another others another
    thru tho til till gonna wanna gotta lemme dunno ain
    """.split()
)

FRAGMENTS = set(
    """
    ing ers ent ght ere ter ation ver ate ting ity ons ine ack ure ood tion ther ard ning ally ant ted
    ment ame ays ite ace les ong ound ary ould ars ents ous ster ance ans ase ings ight ving ying led
    ton onal ool res als ture ated ence ies ink ations ach ile ough ner ves sion ort ily mber ins ley
    ick ble ish sts ved ition ited ical kes ors ening cial ates ason den tting tor ich ket ded ast ked
    iting dent ghts sted ling ens ics ale ends wing uring ina tions sday ses ana ining ire ams ral mas
    tive ore des ney ching ward iness tball ise ities ker ber dents unch ience ils rence cess tic val
    stic ction ces ston ert ger ned ctions ists ium ating ened ists ians tics ably ently ism ments
    ness ful ville ford bury ship ward wood field land ling ster tra ini ola ano ino ero ato ita ura
    ica ina ite ism ett ette ley ney sey ory ories ence ency ances ises ised izing ized ize ise oli
    ary aries ering ered ery eries ian ians ial ially ious iously ive ives ively age ages aged ging
    ding ell don sic fore ween els lar logy gan ama ken ler ole ada ade dom tain zed del ram gest tal ping
    ague ming len mon sen ist bal dan lish sia bert yer lin mer dit sis pes ounds ser ona anda gue sty ado
    ped shire wer mes sus ami mar tice ute yed gers ges alist sha ara thy gon tee aka ala ged icy burg inger
    stance bel shi han ani lier bes oes ria zer mal che chi gie ora tical ila vic ware gal tup mag sher cha
    wan aga ind ito tha tress ric urs lan graphy dian tan cho rel rie vis sec bin ared ira mont ann dal gos
    gel cos lam ake ree stein gar aper cot uro lum rus oner sal ental alo lation eral stra eland eli cal
    una ima acle sley mir ghan kee bey ati lest aland mel awa suk arian erie sur gent gory sier pod tract
    ledge cling zing splay mentary specially pical sten thouse sium vol acker thetic nell sil mus kan quet
    crete maga dor uri rah eta ady tum thon aria mare pia para sham chen ata las eld sie din vas das dos
    geon gio ras ula illy rix mentation atta eared drome aire soc aus pol pac yon cel sar boro mans nan
    col kat gee jin shan hal con san non ion dev min gen ave dar pur rep sub sup anta bon ora ise lis
    """.split()
)

BLOCKED = set(
    """
    amp http https www com org net html href src img jpg png gif rss lol lmao omg wtf smh tbh idk
    rofl lmfao bae fam rt dm pm cc tv gt lt nbsp quot utm
    fuck fucking fucked fucker fucks motherfucker shit shitty bullshit bitch bitches bastard asshole
    dick dicks cock cocks cunt cunts pussy pussies whore whores slut sluts fag fags faggot nigga
    niggas nigger retard retarded twat wank wanker jizz cum tits titties boob boobs porn porno
    hentai rape raped rapist ass damn isis
    """.split()
)


def candidates(bpe_path: str = BPE):
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : NUM_MERGES + 1]
    seen = set()
    for line in lines:
        token = "".join(line.split())
        if not token.endswith("</w>"):
            continue
        word = token[: -len("</w>")]
        if word in seen:
            continue
        seen.add(word)
        yield word


def english_words() -> set[str]:
    try:
        from english_words import get_english_words_set
    except ImportError:
        raise SystemExit("tools/make_vocab.py needs the word list of english-words: pip install english-words==2.0.2")
    return get_english_words_set(["web2"], lower=True, alpha=True)


def keep(word: str, dictionary: set[str]) -> bool:
    if not re.fullmatch(r"[a-z]{3,}", word) or word not in dictionary:
        return False
    onset = re.match(r"[^aeiouy]*", word).group(0)
    if onset and onset not in ONSETS:
        return False
    if not re.search(r"[aeiouy]", word):
        return False
    return word not in STOP_WORDS and word not in FRAGMENTS and word not in BLOCKED


def build(size: int = SIZE) -> list[str]:
    dictionary = english_words()
    words = [w for w in candidates() if keep(w, dictionary)]
    if len(words) < size:
        raise SystemExit(f"only {len(words)} words pass the filters; lower SIZE")
    return words[:size]


HEADER = (
    "# Default preservation vocabulary of ap_erase_fast: {n} common English words, one per line.\n"
    "# Derived from the CLIP BPE merges (MIT licence, see models/assets); regenerate with tools/make_vocab.py.\n"
)


def render(words: list[str]) -> str:
    return HEADER.format(n=len(words)) + "\n".join(words) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    text = render(build())
    if args.check:
        with open(args.out, encoding="utf-8") as fh:
            same = fh.read() == text
        print("vocab_en.txt is up to date" if same else "vocab_en.txt differs from tools/make_vocab.py output")
        return 0 if same else 1
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
