"""A phantom case's text: its report and its questions (closed/open and yes/no), each stating only
what the volume shows, in varied phrasing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from med3dvlm.data import layout
from med3dvlm.data.phantoms.anatomy import CM_PER_UNIT, LESION_KINDS, LESION_SIZES, LEVELS, PHASES, PLANES, PhantomCase

_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}
_KIND_PLURAL = {"cyst": "cysts", "mass": "masses", "calcification": "calcifications"}
_KIND_DESCRIPTORS = {
    "cyst": ("hypodense cyst", "well-defined hypodense cyst", "simple cyst", "fluid-density cyst"),
    "mass": (
        "hyperdense mass",
        "heterogeneous hyperdense mass",
        "lobulated hyperdense mass",
        "solid heterogeneous mass",
    ),
    "calcification": ("calcification", "dense calcification", "coarse calcification"),
}
_PHASE_NOUN = {
    "non_contrast": "non-contrast phase",
    "arterial": "arterial phase",
    "portal_venous": "portal venous phase",
}
_PHASE_ADJ = {"non_contrast": "non-contrast", "arterial": "arterial phase", "portal_venous": "portal venous phase"}
_PHASE_SENTENCES = {
    "non_contrast": ("No intravenous contrast was administered.",),
    "arterial": ("There is dense opacification of the aorta.", "The aorta is brightly opacified."),
    "portal_venous": ("The liver parenchyma is brightly enhanced.", "The aorta is moderately opacified."),
}
_INTROS = (
    "{Plane} CT of the abdomen in the {phase_noun}.",
    "{Plane} {phase_adj} CT images of the abdomen and pelvis.",
    "CT abdomen, {plane} images, {phase_noun}.",
    "{Phase_adj} CT of the abdomen, {plane} images.",
)
_FINDINGS = (
    "{Count} {size} {desc} {be} seen in {loc}{measure}.",
    "There {be} {count} {size} {desc}{measure} in {loc}.",
    "{Loc} contains {count} {size} {desc}{measure}.",
    "{Loc} demonstrates {count} {size} {desc}{measure}.",
)
_KIND_REMARKS = {
    "cyst": ("No solid component or septation.", "Fluid attenuation without a solid component."),
    "mass": ("Malignancy cannot be excluded; tissue sampling is advised.", "Further evaluation is recommended."),
    "calcification": {
        "kidney": ("No associated hydronephrosis.",),
        None: ("Likely sequela of prior granulomatous disease.",),
    },
}
_NORMAL = {
    "liver_clean": ("The liver is normal in size and attenuation.", "The liver is unremarkable."),
    "spleen": ("The spleen is unremarkable.", "The spleen is normal in size."),
    "kidneys": ("The kidneys are unremarkable.", "Both kidneys are normal in size and position."),
    "other_kidney": ("The {side} kidney is unremarkable.", "The {side} kidney appears normal."),
}
_CLOSING = (
    "No free fluid.",
    "No lymphadenopathy.",
    "The urinary bladder is unremarkable.",
    "The visualized lung bases are clear.",
    "The abdominal aorta is normal in caliber.",
)


def _location_phrase(case: PhantomCase, rng: np.random.Generator | None = None) -> str:
    """Where the lesions are, lower case, without article: 'upper pole of the left kidney'."""
    if case.organ == "liver":
        lobe = f"{case.side} hepatic lobe" if rng is None or rng.random() < 0.5 else f"{case.side} lobe of the liver"
        return f"{case.level} part of the {lobe}" if case.level else lobe
    organ = "spleen" if case.organ == "spleen" else f"{case.side} kidney"
    return f"{case.level} pole of the {organ}" if case.level else organ


def _organ_phrase(case: PhantomCase) -> str:
    return f"{case.side} kidney" if case.organ == "kidney" else case.organ


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_report(case: PhantomCase, seed: int = 0) -> str:
    """A radiology-style report stating exactly the case's attributes, in varied phrasing."""
    rng = np.random.default_rng([seed, 4, case.index])
    words = {
        "plane": case.plane,
        "Plane": _cap(case.plane),
        "phase_noun": _PHASE_NOUN[case.phase],
        "phase_adj": _PHASE_ADJ[case.phase],
        "Phase_adj": _cap(_PHASE_ADJ[case.phase]),
    }
    sentences = [_pick(rng, _INTROS).format(**words)]
    if rng.random() < 0.5:
        sentences.append(_pick(rng, _PHASE_SENTENCES[case.phase]))
    n = case.count
    desc = _pick(rng, _KIND_DESCRIPTORS[case.kind])
    if n > 1:
        desc = desc[:-4] + "masses" if desc.endswith("mass") else desc + "s"
    diameter = max(lesion.radius for lesion in case.lesions) * 2.0 * CM_PER_UNIT
    measure = ""
    if rng.random() < 0.7:
        measure = (
            f" measuring approximately {diameter:.1f} cm" if n == 1 else f", the largest measuring {diameter:.1f} cm,"
        )
    template = _pick(rng, _FINDINGS)
    count_word = ("a single" if rng.random() < 0.3 else "a") if n == 1 else _NUMBER[n]
    loc = "the " + _location_phrase(case, rng)
    finding = template.format(
        Count=_cap(count_word),
        count=count_word,
        size=case.size,
        desc=desc,
        be="is" if n == 1 else "are",
        loc=loc,
        Loc=_cap(loc),
        measure=measure,
    )
    sentences.append(finding.replace(",.", "."))
    if rng.random() < 0.6:
        remarks = _KIND_REMARKS[case.kind]
        if isinstance(remarks, dict):
            remarks = remarks["kidney" if case.organ == "kidney" else None]
        sentences.append(_pick(rng, remarks))
    normal = []
    if case.organ != "liver":
        normal.append(_pick(rng, _NORMAL["liver_clean"]))
    if case.organ != "spleen":
        normal.append(_pick(rng, _NORMAL["spleen"]))
    if case.organ == "kidney":
        other = "left" if case.side == "right" else "right"
        normal.append(_pick(rng, _NORMAL["other_kidney"]).format(side=other))
    else:
        normal.append(_pick(rng, _NORMAL["kidneys"]))
    sentences.extend(normal[i] for i in rng.permutation(len(normal)))
    sentences.extend(_CLOSING[i] for i in sorted(rng.choice(len(_CLOSING), size=2, replace=False)))
    return " ".join(sentences)


# Closed/open question vocabularies: the answer is always one of the four choices.
_PLANE_ANSWERS = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
_PLANE_CHOICES = ("Axial", "Coronal", "Sagittal", "Oblique")
_PHASE_ANSWERS = {
    "non_contrast": "Non-contrast",
    "arterial": "Arterial phase",
    "portal_venous": "Portal venous phase",
}
_PHASE_CHOICES = ("Non-contrast", "Arterial phase", "Portal venous phase", "Delayed phase")
_ORGAN_CHOICES = ("Liver", "Spleen", "Kidney", "Pancreas", "Gallbladder", "Urinary bladder", "Stomach")
_KIND_ANSWERS = {"cyst": "Cyst", "mass": "Mass", "calcification": "Calcification"}
_KIND_EXTRA = ("Abscess", "Hematoma", "Lipoma")
_DENSITY_CHOICES = ("Hypodense", "Hyperdense", "Isodense", "Fat density")
_DENSITY_ANSWERS = {"cyst": "Hypodense", "mass": "Hyperdense", "calcification": "Hyperdense"}
_COUNT_CHOICES = ("One", "Two", "Three", "Four")


def _fine_locations() -> list[str]:
    names = [f"{lv} part of the {s} hepatic lobe" for s in ("right", "left") for lv in LEVELS]
    names += [f"{lv} pole of the spleen" for lv in LEVELS]
    names += [f"{lv} pole of the {s} kidney" for s in ("right", "left") for lv in LEVELS]
    return [_cap(n) for n in names]


_LOCATIONS_FINE = tuple(_fine_locations())
_LOCATIONS_COARSE = ("Right hepatic lobe", "Left hepatic lobe", "Spleen", "Right kidney", "Left kidney")

# Question templates by question; {organ}, {lesion}, {kinds}, {kind_np}, {be}, {do} filled per case.
_Q_PLANE = (
    "Which plane is this CT image displayed in?",
    "In which plane was this image reconstructed?",
    "What is the imaging plane of this scan?",
)
_Q_PHASE = (
    "In which contrast phase was this CT scan acquired?",
    "What is the phase of this CT scan?",
    "Which phase of contrast enhancement does this image show?",
)
_Q_ORGAN = (
    "Which organ contains the {lesion}?",
    "In which organ is the abnormality located?",
    "Which organ shows an abnormality in this image?",
)
_Q_KIND = (
    "What type of lesion is seen in the {organ}?",
    "What is the most likely abnormality in the {organ}?",
    "What abnormality is present in the {organ}?",
)
_Q_DENSITY = (
    "What is the attenuation of the {lesion} relative to the surrounding {organ}?",
    "How {do} the {lesion} appear compared with the {organ} parenchyma?",
)
_Q_DESCRIBE = (
    "Which description best fits the abnormality in the {organ}?",
    "How would you describe the {lesion} in the {organ}?",
)
_Q_COUNT = ("How many {kinds} are seen in the {organ}?", "What is the number of {kinds} in the {organ}?")
_Q_LOCATION = (
    "Where {be} the {kind_np} located?",
    "What is the location of the {kind_np}?",
    "Where in the abdomen is the abnormality?",
)


def _choices(
    rng: np.random.Generator, answer: str, pool: Sequence[str], letter: str, preferred: Sequence[str] = ()
) -> dict[str, str]:
    """Four distinct choices with ``answer`` at ``letter``; distractors prefer ``preferred``."""
    preferred = [p for p in preferred if p != answer]
    rest = [p for p in pool if p != answer and p not in preferred]
    preferred = [preferred[i] for i in rng.permutation(len(preferred))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    distractors = (preferred + rest)[:3]
    distractors = [distractors[i] for i in rng.permutation(3)]
    out, it = {}, iter(distractors)
    for candidate in layout.ANSWER_LETTERS:
        out[candidate] = answer if candidate == letter else next(it)
    return out


def make_questions(case: PhantomCase, report: str, image: str, seed: int = 0) -> tuple[list[list], list[list]]:
    """Closed/open rows (8 per case, letters exactly balanced) and yes/no rows (6, 3 Yes + 3 No)."""
    rng = np.random.default_rng([seed, 5, case.index])
    n = case.count
    organ = _organ_phrase(case)
    lesion = "lesion" if n == 1 else "lesions"
    kind_np = case.kind if n == 1 else _KIND_PLURAL[case.kind]
    be = "is" if n == 1 else "are"
    fmt = {
        "organ": organ,
        "lesion": lesion,
        "kinds": _KIND_PLURAL[case.kind],
        "kind_np": kind_np,
        "be": be,
        "do": "does" if n == 1 else "do",
    }
    size_kind = f"{_cap(case.size)} {case.kind}"
    size_kind_pool = [f"{_cap(s)} {k}" for k in LESION_KINDS for s in LESION_SIZES]
    other_size = "large" if case.size == "small" else "small"
    location = _cap(_location_phrase(case))
    location_pool = _LOCATIONS_FINE if case.level else _LOCATIONS_COARSE
    organ_word = "hepatic" if case.organ == "liver" else case.organ
    same_organ = [loc for loc in location_pool if organ_word in loc.lower()]
    organ_answer = _cap(case.organ)
    specs = [  # (type, question templates, answer, pool, preferred distractors)
        (1, _Q_PLANE, _PLANE_ANSWERS[case.plane], _PLANE_CHOICES, ()),
        (2, _Q_PHASE, _PHASE_ANSWERS[case.phase], _PHASE_CHOICES, ()),
        (3, _Q_ORGAN, organ_answer, _ORGAN_CHOICES, ("Liver", "Spleen", "Kidney")),
        (4, _Q_KIND, _KIND_ANSWERS[case.kind], (*_KIND_ANSWERS.values(), *_KIND_EXTRA), _KIND_ANSWERS.values()),
        (4, _Q_DENSITY, _DENSITY_ANSWERS[case.kind], _DENSITY_CHOICES, ()),
        (4, _Q_DESCRIBE, size_kind, size_kind_pool, (f"{_cap(other_size)} {case.kind}",)),
        (4, _Q_COUNT, _cap(_NUMBER[n]), _COUNT_CHOICES, ()),
        (5, _Q_LOCATION, location, location_pool, same_organ),
    ]
    letters = [layout.ANSWER_LETTERS[i % 4] for i in rng.permutation(2 * len(layout.ANSWER_LETTERS))]
    assert len(letters) == len(specs)
    closed = []
    for (qtype, templates, answer, pool, preferred), letter in zip(specs, letters):
        question = _pick(rng, templates).format(**fmt)
        choices = _choices(rng, answer, pool, letter, preferred)
        options = [choices[x] for x in layout.ANSWER_LETTERS]
        closed.append([image, report, qtype, question, *options, answer, letter])

    yes = layout.YES_NO_ANSWERS[0]
    answers = [layout.YES_NO_ANSWERS[i // 3] for i in rng.permutation(6)]

    def other(options: Sequence, truth: object) -> object:
        rest = [o for o in options if o != truth]
        return rest[int(rng.integers(len(rest)))]

    yes_no = []
    # 1 Plane
    plane = case.plane if answers[0] == yes else other(PLANES, case.plane)
    article = "an" if plane == "axial" else "a"
    q = _pick(rng, (f"Is this {article} {plane} image?", f"Is this image displayed in the {plane} plane?"))
    yes_no.append((1, q))
    # 2 Phase
    phase = case.phase if answers[1] == yes else other(PHASES, case.phase)
    q = {
        "non_contrast": "Was this scan performed without intravenous contrast?",
        "arterial": "Was this scan acquired in the arterial phase?",
        "portal_venous": "Was this scan acquired in the portal venous phase?",
    }[phase]
    yes_no.append((2, q))
    # 3 Organ
    if answers[2] == yes:
        asked = organ
    else:
        clean = ["liver", "spleen", "kidneys", "urinary bladder"]
        if case.organ == "kidney":
            other_kidney = "left kidney" if case.side == "right" else "right kidney"
            clean = ["liver", "spleen", "urinary bladder", other_kidney]
        else:
            clean.remove(case.organ)
        asked = clean[int(rng.integers(len(clean)))]
    does = "Do" if asked == "kidneys" else "Does"
    q = _pick(rng, (f"Is there an abnormality in the {asked}?", f"{does} the {asked} contain a lesion?"))
    yes_no.append((3, q))
    # 4 Abnormality: kind
    kind = case.kind if answers[3] == yes else other(LESION_KINDS, case.kind)
    article = "an" if kind[0] in "aeiou" else "a"
    if n == 1:
        q = f"Is the lesion in the {organ} {article} {kind}?"
    else:
        q = f"Are the lesions in the {organ} {_KIND_PLURAL[kind]}?"
    yes_no.append((4, q))
    # 5 Location
    loc = location if answers[4] == yes else other(location_pool, location)
    yes_no.append((5, f"{_cap(be)} the {kind_np} located in the {loc[0].lower() + loc[1:]}?"))
    # 4 Abnormality: size or count
    if rng.random() < 0.5:
        size = case.size if answers[5] == yes else other_size
        q = f"Is the {case.kind} in the {organ} {size}?" if n == 1 else f"Are the {kind_np} in the {organ} {size}?"
    else:
        m = n if answers[5] == yes else other((1, 2, 3), n)
        if m == 1:
            q = f"Is there exactly one {case.kind} in the {organ}?"
        else:
            q = f"Are there exactly {_NUMBER[m]} {_KIND_PLURAL[case.kind]} in the {organ}?"
    yes_no.append((4, q))
    yn_rows = [[image, report, qtype, q, a] for (qtype, q), a in zip(yes_no, answers)]
    return closed, yn_rows


def write_case_texts(case: PhantomCase, image: str, seed: int = 0) -> tuple[str, list[list], list[list]]:
    """Report, closed/open rows and yes/no rows of one case (``image`` = its relative path)."""
    report = make_report(case, seed)
    closed, yes_no = make_questions(case, report, image, seed)
    return report, closed, yes_no
