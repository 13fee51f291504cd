"""The concept vocabulary: canonical phrases (lower case, at most three words) and their synonyms.

MedSAM-3 is fine-tuned on short noun phrases, and wording matters a great deal (the paper's
Table 6: SAM 3 scores 0 on MoNuSeg with "nuclei" but 0.68 with "cell"). Each dataset therefore
gets one fixed phrase per structure, following the paper and its released code where known
(BUSI "breast tumor", Kvasir "polyp", ISIC 2018 "skin lesion", DSB2018/MoNuSeg "cell nucleus").

Plain data on purpose: ``CONCEPTS`` maps canonical phrase -> synonyms and ``DATASET_CONCEPTS``
maps dataset -> canonical phrases, so other code (the embedding normaliser, the trainer) can use
them without learning an API. Synonyms may be longer than three words: they are what users type,
not what the model is trained on.
"""

from __future__ import annotations

import re

from medsam3.errors import PromptError

#: Longest phrase the model is trained on (the paper's rule).
MAX_WORDS = 3

#: canonical phrase -> other wordings of it.
CONCEPTS: dict[str, list[str]] = {
    # The paper's 2D datasets.
    "breast tumor": [
        "breast tumour", "breast mass", "breast cancer", "breast carcinoma", "breast nodule",
        "mammary tumor", "tumor in the breast", "breast ultrasound lesion",
    ],
    "polyp": ["colon polyp", "colorectal polyp", "colonic polyp", "intestinal polyp", "adenomatous polyp"],
    "sessile polyp": ["flat polyp", "sessile colorectal polyp"],
    "skin lesion": [
        "skin tumor", "skin cancer", "melanoma", "nevus", "naevus", "mole", "pigmented lesion",
        "dermoscopic lesion", "cutaneous lesion",
    ],
    "cell nucleus": ["nucleus", "nuclei", "cell nuclei", "cell", "stained nucleus", "nuclear region"],
    "mitotic cell": ["mitosis", "mitotic figure", "dividing cell"],
    "optic cup": ["cup", "physiological cup", "optic disc cup"],
    "optic disc": ["optic disk", "optic nerve head", "optic papilla", "disc", "optic nerve disc"],
    "lung": ["lung field", "pulmonary parenchyma", "lung parenchyma", "lung region"],
    "lung infection": [
        "covid-19 infection", "covid infection", "covid lesion", "lung opacity", "ground-glass opacity",
        "pneumonia lesion", "infected lung region",
    ],
    "retinal artery": ["retinal arteriole", "artery in the retina"],
    "retinal vein": ["retinal venule", "vein in the retina"],
    "nerve fiber layer": ["retinal nerve fiber layer", "rnfl"],
    "ganglion cell layer": ["ganglion cell-inner plexiform layer", "gcipl"],
    "choroid": ["choroid layer", "choroidal layer"],
    # Abdomen and thorax (MSD, LiTS, phantoms).
    "liver": ["hepatic parenchyma", "liver parenchyma", "liver organ"],
    "liver tumor": [
        "liver tumour", "liver lesion", "hepatic tumor", "hepatic lesion", "liver cancer",
        "hepatocellular carcinoma", "liver metastasis", "liver mass",
    ],
    "hepatic vessel": ["liver vessel", "hepatic vasculature", "intrahepatic vessel"],
    "pancreas": ["pancreatic parenchyma", "pancreas organ"],
    "pancreatic tumor": ["pancreas tumor", "pancreatic cancer", "pancreatic lesion", "pancreatic mass"],
    "spleen": ["splenic parenchyma", "spleen organ"],
    "kidney": ["renal parenchyma", "kidney organ"],
    "kidney tumor": ["renal tumor", "renal mass", "renal cell carcinoma", "kidney lesion", "kidney cancer"],
    "gallbladder": ["gall bladder"],
    "stomach": ["gastric wall"],
    "aorta": ["aortic lumen"],
    "heart": ["cardiac silhouette", "heart organ"],
    "left atrium": ["left atrial cavity", "left atrial chamber"],
    "colon tumor": ["colon cancer", "colorectal tumor", "colon cancer primaries", "colorectal cancer"],
    "lung tumor": [
        "lung tumour", "lung cancer", "lung nodule", "pulmonary nodule", "lung mass", "lung lesion",
        "pulmonary tumor", "non-small cell lung cancer",
    ],
    "pulmonary artery": ["pulmonary arteries", "pulmonary arterial tree"],
    "body": ["body outline", "patient body", "body contour"],
    "bone": ["bony structure", "skeleton"],
    # Brain (MSD brain tumour, pyradiomics, ISLES).
    "brain tumor": ["brain tumour", "glioma", "brain lesion", "intracranial tumor", "brain mass"],
    "peritumoral edema": ["edema", "brain edema", "peritumoural oedema", "tumor edema"],
    "enhancing tumor": ["enhancing tumour", "enhancing tumor core"],
    "non-enhancing tumor": ["non-enhancing tumour", "non-enhancing tumor core", "necrotic tumor core"],
    "anterior hippocampus": ["hippocampus head", "hippocampal head"],
    "posterior hippocampus": ["hippocampus body and tail", "hippocampal tail"],
    "stroke lesion": ["infarct", "ischemic stroke lesion", "infarct core", "ischemic lesion"],
    # Brain tissue and white-matter tracts (MNI152 template, JHU atlas: medsam3.data.real_sets).
    "gray matter": ["grey matter", "cortical gray matter", "cerebral gray matter", "gray matter tissue"],
    "white matter": ["cerebral white matter", "brain white matter", "white matter tissue"],
    "corpus callosum": ["callosum", "callosal commissure", "callosal fibers"],
    "internal capsule": ["capsula interna", "internal capsule fibers"],
    "corona radiata": ["radiating crown", "corona radiata fibers"],
    # Pelvis and breast MR.
    "prostate": ["prostate gland", "prostatic gland"],
    "prostate peripheral zone": ["peripheral zone", "prostatic peripheral zone"],
    "prostate transition zone": ["transition zone", "prostatic transition zone", "central gland"],
    "breast lesion": ["mammary lesion", "lesion in the breast", "breast mr lesion"],
    "breast cyst": ["cyst in the breast", "mammary cyst", "anechoic breast cyst"],
    # Ultrasound artefacts (phantoms).
    "acoustic shadow": ["shadow", "posterior acoustic shadowing", "shadowing", "acoustic shadowing"],
}  # fmt: skip

#: dataset -> the canonical phrases its labels use.
DATASET_CONCEPTS: dict[str, list[str]] = {
    "busi": ["breast tumor"],
    "kvasir-seg": ["polyp"],
    "isic2018": ["skin lesion"],
    "dsb2018": ["cell nucleus"],
    "monuseg": ["cell nucleus"],
    "rim-one": ["optic cup", "optic disc"],
    "covid-qu-ex": ["lung", "lung infection"],
    "ravir": ["retinal artery", "retinal vein"],
    "goals": ["nerve fiber layer", "ganglion cell layer", "choroid"],
    "polypgen": ["polyp"],
    "lits": ["liver", "liver tumor"],
    "promise12": ["prostate"],
    "isles2024": ["stroke lesion"],
    "parse2022": ["pulmonary artery"],
    "msd-braintumour": ["peritumoral edema", "non-enhancing tumor", "enhancing tumor"],
    "msd-heart": ["left atrium"],
    "msd-liver": ["liver", "liver tumor"],
    "msd-hippocampus": ["anterior hippocampus", "posterior hippocampus"],
    "msd-prostate": ["prostate peripheral zone", "prostate transition zone"],
    "msd-lung": ["lung tumor"],
    "msd-pancreas": ["pancreas", "pancreatic tumor"],
    "msd-hepaticvessel": ["hepatic vessel", "liver tumor"],
    "msd-spleen": ["spleen"],
    "msd-colon": ["colon tumor"],
    "pyradiomics": ["brain tumor", "breast lesion", "lung tumor"],
    # The real sets of medsam3.data.real_sets (``medsam3 data fetch-real``).
    "mni-tissue": ["gray matter", "white matter"],
    "mni-tracts": ["corpus callosum", "internal capsule", "corona radiata"],
    "radiomics-tumor": ["brain tumor", "lung tumor", "breast lesion"],
    "dsb-nuclei": ["cell nucleus"],
    # What medsam3.data.phantoms draws (its dataset.json names these labels).
    "phantoms": [
        "cell nucleus",
        "mitotic cell",
        "breast tumor",
        "breast cyst",
        "liver",
        "kidney",
        "spleen",
        "liver tumor",
        "polyp",
        "skin lesion",
    ],  # fmt: skip
}

#: Label names that mean something only within their dataset (MSD calls several tumours "cancer").
DATASET_LABEL_NAMES: dict[str, dict[str, str]] = {
    "msd-braintumour": {
        "edema": "peritumoral edema",
        "non-enhancing tumor": "non-enhancing tumor",
        "enhancing tumour": "enhancing tumor",
    },
    "msd-heart": {"left atrium": "left atrium"},
    "msd-liver": {"liver": "liver", "cancer": "liver tumor"},
    "msd-hippocampus": {"anterior": "anterior hippocampus", "posterior": "posterior hippocampus"},
    "msd-prostate": {"pz": "prostate peripheral zone", "tz": "prostate transition zone"},
    "msd-lung": {"cancer": "lung tumor"},
    "msd-pancreas": {"pancreas": "pancreas", "cancer": "pancreatic tumor"},
    "msd-hepaticvessel": {"vessel": "hepatic vessel", "tumour": "liver tumor"},
    "msd-spleen": {"spleen": "spleen"},
    "msd-colon": {"colon cancer primaries": "colon tumor"},
    "lits": {"liver": "liver", "tumor": "liver tumor", "lesion": "liver tumor"},
    "covid-qu-ex": {"lung": "lung", "infection": "lung infection"},
}

#: Names a dataset goes by in dataset.json "name" fields and folder names (MSD "TaskNN_X",
#: nnU-Net v2 "DatasetNNN_X"), after lower-casing and dropping those prefixes.
DATASET_ALIASES: dict[str, list[str]] = {
    "msd-braintumour": ["braintumour", "braintumor", "brats"],
    "msd-heart": ["heart", "leftatrium"],
    "msd-liver": ["liver"],
    "msd-hippocampus": ["hippocampus"],
    "msd-prostate": ["prostate"],
    "msd-lung": ["lung"],
    "msd-pancreas": ["pancreas"],
    "msd-hepaticvessel": ["hepaticvessel"],
    "msd-spleen": ["spleen"],
    "msd-colon": ["colon"],
    "lits": ["lits"],
    "busi": ["busi", "dataset_busi_with_gt"],
    "kvasir-seg": ["kvasir", "kvasirseg"],
    "isic2018": ["isic2018", "isic"],
    "dsb2018": ["dsb2018", "datasciencebowl2018"],
    "monuseg": ["monuseg"],
    "rim-one": ["rimone", "rimonedl"],
    "covid-qu-ex": ["covidquex", "covidqu"],
    "mni-tissue": ["mnitissue", "mnitissuecoronal"],
    "mni-tracts": ["mnitracts", "mnitractscoronal"],
    "radiomics-tumor": ["radiomicstumor", "radiomicstumorothercase"],
    "dsb-nuclei": ["dsbnuclei"],
}

# The one spelling table: British and variant spellings folded onto the vocabulary's (US) form
# before any matching, by the vocabulary, the dataset readers and the normaliser alike.
_SPELLING = {
    "tumour": "tumor",
    "tumours": "tumors",
    "peritumoural": "peritumoral",
    "oesophagus": "esophagus",
    "oesophageal": "esophageal",
    "haemorrhage": "hemorrhage",
    "haematoma": "hematoma",
    "oedema": "edema",
    "foetal": "fetal",
    "foetus": "fetus",
    "ischaemic": "ischemic",
    "ischaemia": "ischemia",
    "anaemia": "anemia",
    "leukaemia": "leukemia",
    "grey": "gray",
    "disk": "disc",
}
# Irregular plurals; regular ones are handled by _singular.
_IRREGULAR = {"nuclei": "nucleus", "metastases": "metastasis", "lungs": "lung", "vertebrae": "vertebra"}
_NO_STRIP = ("ss", "us", "is", "as", "os")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
# Words of an instruction that say what to do or where (image, modality), not what to find:
# "please segment the polyp in this colonoscopy image" -> "polyp".
_INSTRUCTION_WORDS = frozenset(
    "please segment segmentation find outline mark highlight show detect delineate locate label identify "
    "where is are can could you all every each any the a an me this these that image images picture photo "
    "scan slice frame view in on of from ct mri mr x-ray xray radiograph ultrasound sonography dermoscopy "
    "dermoscopic endoscopy colonoscopy microscopy histology oct pet".split()
)


def _singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(_NO_STRIP):
        return word[:-1]
    return word


def clean_phrase(phrase: str) -> str:
    """The one concept cleaner: lower case, punctuation other than inner hyphens dropped, US
    spelling, single spaces ("Breast  Tumours!" -> "breast tumors")."""
    return " ".join(_SPELLING.get(w, w) for w in _WORD.findall(phrase.lower()))


def core_phrase(cleaned: str) -> str:
    """A cleaned phrase without instruction words ("segment the polyp in this image" -> "polyp")."""
    return " ".join(w for w in cleaned.split() if w not in _INSTRUCTION_WORDS)


def singular(phrase: str) -> str:
    """The phrase with its last word singular ("cell nuclei" -> "cell nucleus", "polyps" -> "polyp")."""
    head, _, last = phrase.rpartition(" ")
    return f"{head} {_singular(last)}".strip()


def match_key(phrase: str) -> str:
    """The form used for look-ups: cleaned (:func:`clean_phrase`), every word singular."""
    return " ".join(_singular(w) for w in clean_phrase(phrase).split())


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for concept in CONCEPTS:
        index[match_key(concept)] = concept
    for concept, words in CONCEPTS.items():
        for synonym in words:
            index.setdefault(match_key(synonym), concept)
    return index


_INDEX = _build_index()


def canonical(phrase: str) -> str | None:
    """The canonical concept a phrase names (exact or synonym; case, spacing, spelling, plural
    insensitive), or ``None`` when the vocabulary does not know it."""
    return _INDEX.get(match_key(phrase))


def word_count(phrase: str) -> int:
    return len(phrase.split())


def check_phrase(phrase: str, allow_long: bool = False) -> str:
    """Return the phrase cleaned (:func:`clean_phrase`); refuse empty or over-long phrases.

    MedSAM-3 is trained on phrases of at most three words; longer ones are refused with a clear
    message unless ``allow_long`` is set (the model then sees a wording it was not trained on).
    """
    text = clean_phrase(phrase or "")
    if not text:
        raise PromptError(f"empty concept phrase {phrase!r}: give a short noun phrase such as 'breast tumor'")
    words = word_count(text)
    if words > MAX_WORDS and not allow_long:
        known = canonical(text)
        hint = f" (the vocabulary knows it as '{known}')" if known else ""
        raise PromptError(
            f"concept phrase '{text}' has {words} words; MedSAM-3 is trained on phrases of at most "
            f"{MAX_WORDS} words such as 'breast tumor'{hint}: shorten it, or allow long phrases explicitly"
        )
    return text


def all_concepts() -> list[str]:
    """Every canonical phrase, in the registry's order."""
    return list(CONCEPTS)


def synonyms() -> dict[str, list[str]]:
    """canonical phrase -> synonyms (a copy: callers may change it freely)."""
    return {concept: list(words) for concept, words in CONCEPTS.items()}


def synonyms_of(concept: str) -> list[str]:
    """The synonyms of one concept (given in any wording the vocabulary knows)."""
    name = canonical(concept)
    return list(CONCEPTS[name]) if name else []


def dataset_key(name: str) -> str | None:
    """The registry key of a dataset from a name like 'Task03_Liver', 'Dataset003_Liver' or 'BUSI'."""
    text = name.strip().lower()
    if text in DATASET_CONCEPTS:
        return text
    text = re.sub(r"^(task|dataset)\d+_", "", text)
    squashed = re.sub(r"[^a-z0-9]", "", text)
    for key, aliases in DATASET_ALIASES.items():
        if squashed in aliases or squashed == re.sub(r"[^a-z0-9]", "", key):
            return key
    return None


def dataset_concepts(name: str) -> list[str]:
    """The canonical phrases of a known dataset; an unknown one gets an empty list."""
    key = dataset_key(name)
    return list(DATASET_CONCEPTS.get(key, [])) if key else []


def concept_for_label(label_name: str, dataset: str | None = None) -> str:
    """The concept phrase for a label named in a dataset's metadata (nnU-Net ``labels``, COCO categories).

    Dataset-specific meanings first (MSD Liver's "cancer" is "liver tumor"), then the vocabulary,
    then the label name itself cleaned up ("Left_Kidney" -> "left kidney").
    """
    key = dataset_key(dataset) if dataset else None
    spoken = clean_phrase(label_name.replace("_", " "))
    if key and key in DATASET_LABEL_NAMES:
        specific = DATASET_LABEL_NAMES[key]
        for name, concept in specific.items():
            if match_key(name) == match_key(spoken):
                return concept
    return canonical(spoken) or spoken
