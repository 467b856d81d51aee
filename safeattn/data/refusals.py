"""Coarse harm categories and refusal responses that give a fitting reason.

Every harmful row gets one coarse category (:func:`coarse_category`):

``cyber``, ``violence_weapons``, ``fraud_financial``, ``hate_harassment``, ``self_harm``,
``drugs``, ``privacy``, ``misinformation``, ``other``.

AdvBench's PyRIT ``harm_categories`` (e.g. "Financial and Business; Societal and Cultural")
describe *who is harmed*, not *what is asked*, so they do not say which reason a refusal
should give ("Write a script that can exploit vulnerabilities" is labelled Financial and
Business). The category is therefore taken from keyword rules on the prompt text, checked in
a fixed priority order; when no rule fires, from the row's ``harm_subcategories`` (AdvBench)
or its XSTest ``category``; otherwise ``other``. XSTest's ``contrast_discr`` and
``contrast_privacy`` rows are always ``hate_harassment`` and ``privacy``. The rules are
deterministic; on AdvBench they leave 20 of 520 prompts in ``other`` (child abuse material,
smuggling, vandalism, manipulation, ...), on XSTest-unsafe 1 of 200.

:func:`refusal_for` picks one of 4 refusals of the row's category by a hash of an id, so the
same id always gets the same text. Half of them start with the decoding refusal prefix
``"Sorry, I cannot fulfill your request because"`` (DESIGN.md §3), so a model trained on them
continues that prefix fluently; every one contains a phrase of the AdvBench/GCG refusal list
(:mod:`safeattn.judge`), so the keyword judge scores them as refusals.
"""
from __future__ import annotations

import re
from typing import Mapping

from .core import hash64

__all__ = ["CATEGORIES", "REFUSALS", "coarse_category", "refusal_for"]

CATEGORIES = ("cyber", "violence_weapons", "fraud_financial", "hate_harassment", "self_harm",
              "drugs", "privacy", "misinformation", "other")

# (category, pattern) in priority order; the first match wins. Patterns are matched
# case-insensitively against the prompt; \b anchors keep "drug" out of "drugstore" etc.
_RULES: tuple[tuple[str, str], ...] = (
    ("other", r"\bchild pornograph|\bsexual(?:ly)? (?:exploit|abuse)|\btraffick|\bsmuggl|"
              r"\bescape from (?:a )?(?:prison|jail|correctional)|\babuse\b.*\b(?:child|minor)"),
    ("self_harm", r"\bsuicid|\bself[- ]harm|\bharm (?:themselves|yourself|myself)|\bcut(?:ting)? "
                  r"(?:themselves|yourself|myself)|\banorexi|\bbulimi|\beating disorder|"
                  r"\bstarv(?:e|ing) (?:themselves|yourself|myself)|\bkill (?:myself|yourself)"),
    ("drugs", r"\bdrugs?\b|\bcocaine|\bheroin|\bmeth(?:amphetamine)?\b|\bnarcotic|\bopioid|"
              r"\bfentanyl|\bcontrolled substance|\bmarijuana|\bcannabis|\blsd\b|\bmdma\b|"
              r"\becstasy\b|\b(?:make|buy|smoke|sell) crack\b|\bcrack cocaine|\bweed\b|\bsteroids|"
              r"\bdate rape|\bget high\b|\bpills\b|\bpsychedelic|\bsubstance abuse"),
    ("cyber", r"\bhack|\bmalware|\bvirus|\bransomware|\bexploit(?:s|ing)? (?:a )?vulnerab|"
              r"\bvulnerabilit|\bbotnet|\bkeylogger|\bddos\b|\bdenial[- ]of[- ]service|"
              r"\bspyware|\btrojan|\bworm\b|\brootkit|\bantivirus|\bfirewall|\bsql injection|"
              r"\bcrack (?:a |the )?(?:passwords?|encryption|software)|\bcyber|"
              r"\b(?:computer|network|server|database|wi-?fi)s?\b|\bsecurity (?:system|measures)|"
              r"\bpassword|\bbypass\b.*\b(?:security|authentication|login)"),
    ("violence_weapons", r"\bbomb|\bexplosive|\bweapon|\bguns?\b|\bfirearm|\bammunition|\bkill|"
                         r"\bmurder|\bassassinat|\bpoison|\bterror|\bshoot|\bviolen|\btortur|"
                         r"\bkidnap|\bhurt\b|\binjur|\battack (?:on )?(?:a |the )?(?:person|"
                         r"people|crowd|school|group)|\bmass shooting|\bbioweapon|\bchemical "
                         r"weapon|\bderail|\barson|\bstab\b|\bstrangl|\bbehead|\bexecut(?:e|ing)"
                         r" (?:a |someone|people|my|him|her)|\bgenocid|\bholocaust|\bmassacre|"
                         r"\bethnic cleansing|\bharm (?:a |someone|others|people|children|animals)"
                         r"|\bphysical harm|\banimal cruelty|\bbeat (?:up|someone|my)|\bblow up|"
                         r"\b(?:dead )?body\b|\bcorpse|\beliminat|\boff a cliff|\bgut\b|"
                         r"\bdecapitat|\bdrown|\bsuffocat|\boverpower|\btake out\b|\bslaughter|"
                         r"\bbutcher|\bhang (?:a|my|him|her|someone)|\bslit|\bchoke|\bpunch|"
                         r"\bskull|\bbleed|\bcrash (?:a|an|the|my|into)|\bsnipe|\bhijack"),
    ("misinformation", r"\bfake news|\bmisinformation|\bdisinformation|\bconspiracy|"
                       r"\bpropaganda|\bfalse (?:information|claims?|news|stor)|\bhoax|"
                       r"\bspread(?:s|ing)? (?:false|fake|lies|rumou?rs)|\bfake (?:review|"
                       r"stor|article|website)|\bmanipulate (?:public opinion|the public)|"
                       r"\bmislead|\bdeceiv(?:e|ing) (?:the public|people)|\breview\b.*\bnot "
                       r"(?:even )?(?:used|tested)|\bdeny(?:ing)? "
                       r"the"),
    ("privacy", r"\bpersonal (?:information|data|details)|\bprivate (?:information|data)|"
                r"\bsensitive information|\btrack(?:s|ing)? (?:someone|a person|people|user|"
                r"the location|their|my)|\bspy(?:ing)? on|\bsurveil|\bstalk|\bdox|\blocation "
                r"of|\bwithout (?:their|his|her|the user's) (?:knowledge|consent)|\bhome "
                r"address|\bsocial security number|\bmedical records|\bemail address|"
                r"\bphone number|\bcollect(?:s|ing)? (?:user )?data|\bwhere (?:does|can i find)"),
    ("fraud_financial", r"\bfraud|\bscam|\bsteal|\btheft|\bcounterfeit|\binsider trading|"
                        r"\blaunder|\btax(?:es)?\b|\bembezzl|\bcredit card|\bidentity|\bponzi|"
                        r"\bphishing|\bcheat|\bshoplift|\bmoney|\bfinancial|\bbank|\bforg(?:e|ing|"
                        r"ery)|\bfake (?:id|identit|document|invoice|charity)|\bmanipulat\w* "
                        r"(?:stock|market|price)|\bstock (?:price|market)|\bextort|\bblackmail|"
                        r"\bbribe|\bpirat|\bcopyright|\bplagiari|\bdefraud|\binsurance|"
                        r"\bgambl|\brob\b|\brobb|"
                        r"\bbreak into (?:a |someone's )?(?:house|home|car)"),
    ("hate_harassment", r"\bhate|\bracis|\bdiscriminat|\bharass|\bbull(?:y|ies|ying)|\bthreat|"
                        r"\bsexis|\bminorit|\breligio|\bethnic|\bslur|\bdefam|\bintimidat|"
                        r"\binsult|\bhumiliat|\bdehumaniz|\bxenophob|\bhomophob|\btransphob|"
                        r"\bantisemit|\bislamophob|\bmisogyn|\bwomen (?:are|should)|\btroll|"
                        r"\bshould(?:n't| not)\b.*\b(?:be allowed|have (?:the )?right)|"
                        r"\bwhy (?:are|should|do)\b.*\b(?:people|women|men|immigrants)"),
    ("violence_weapons", r"\bdangerous|\bharm\b|\bharmful|\bdamage|\bdestroy|\bsabotag|\briot|"
                         r"\bviolent|\bwar\b|\bsuffer"),
)
_COMPILED = tuple((cat, re.compile(pat, re.I)) for cat, pat in _RULES)

_SUBCATEGORY_MAP = {
    "Self-harm": "self_harm", "Addiction": "drugs", "Privacy loss": "privacy",
    "Confidentiality loss": "privacy", "Impersonation/identity theft": "fraud_financial",
    "Financial/earnings loss": "fraud_financial", "Information degradation": "misinformation",
    "Political manipulation": "misinformation", "Electoral interference": "misinformation",
    "Harassment/abuse/intimidation": "hate_harassment", "Discrimination": "hate_harassment",
    "Dehumanisation/objectification": "hate_harassment", "Stereotyping": "hate_harassment",
    "Defamation/libel/slander": "hate_harassment", "Loss of life": "violence_weapons",
    "Bodily injury": "violence_weapons", "Violence/armed conflict": "violence_weapons",
    "Business operations/infrastructure damage": "cyber",
    "Critical infrastructure damage": "cyber",
}
_XSTEST_FIRST = {"contrast_discr": "hate_harassment", "contrast_privacy": "privacy"}
_XSTEST_MAP = {**_XSTEST_FIRST,
               "contrast_historical_events": "violence_weapons",
               "contrast_homonyms": "violence_weapons",
               "contrast_figurative_language": "violence_weapons",
               "contrast_safe_targets": "violence_weapons",
               "contrast_safe_contexts": "violence_weapons",
               "contrast_definitions": "violence_weapons"}


def coarse_category(row: Mapping) -> str:
    """The coarse harm category of a harmful row (see the module docstring)."""
    text = row.get("prompt", "")
    if row.get("category") in _XSTEST_FIRST:
        return _XSTEST_FIRST[row["category"]]
    for cat, rx in _COMPILED:
        if rx.search(text):
            return cat
    for sub in row.get("harm_subcategories") or ():
        if sub in _SUBCATEGORY_MAP:
            return _SUBCATEGORY_MAP[sub]
    return _XSTEST_MAP.get(row.get("category") or "", "other")


_P = "Sorry, I cannot fulfill your request because"

#: Refusals per coarse category; each states a reason that fits the category.
REFUSALS: dict[str, tuple[str, ...]] = {
    "cyber": (
        f"{_P} it asks for help breaking into computer systems or writing malicious code. "
        "Unauthorized access and malware compromise other people's data, devices and "
        "services, and they are crimes in most countries. If you are interested in security, "
        "I can explain how to protect systems or how to get started with authorized "
        "penetration testing.",
        f"{_P} exploiting vulnerabilities or attacking networks without permission harms "
        "the people and organizations who depend on those systems. I'd be glad to help with "
        "defensive measures instead, such as patching, strong authentication and monitoring.",
        "I'm sorry, but I cannot help with hacking, malware or bypassing security controls. "
        "Tools like these are used to steal data and disrupt services, so providing them "
        "could cause real damage. I can help you learn secure coding or responsible "
        "disclosure instead.",
        "I cannot provide instructions for gaining unauthorized access to accounts, "
        "devices or networks, because doing so violates other people's security and privacy. "
        "If you have lost access to your own account, the service's official recovery "
        "process is the right place to start.",
    ),
    "violence_weapons": (
        f"{_P} it could lead to people being seriously hurt or killed. I won't give "
        "instructions for weapons, explosives or attacks on anyone. If you or someone else "
        "is in danger, please contact local emergency services.",
        f"{_P} helping to build weapons or plan violence puts lives at risk. I can share "
        "information about safety, conflict de-escalation or how to get help instead.",
        "I'm sorry, but I cannot assist with anything meant to injure people or animals. "
        "Violence causes lasting harm to victims and communities. If you are feeling angry "
        "or unsafe, talking to someone you trust or a professional can help.",
        "I cannot help with this. Instructions for causing physical harm or making "
        "dangerous devices could be used to hurt others, so I won't provide them. I'm happy "
        "to help with a different, safe topic.",
    ),
    "fraud_financial": (
        f"{_P} it involves deceiving or stealing from people, which causes real financial "
        "harm to the victims and is a crime. If you need help with budgeting, legitimate "
        "business practices or protecting yourself from scams, I'm glad to help.",
        f"{_P} fraud, theft and market manipulation take money from people who did nothing "
        "to deserve it. I can explain how these schemes work so that you can recognize and "
        "avoid them.",
        "I'm sorry, but I cannot help with scams, counterfeiting or evading the law for "
        "financial gain. These schemes hurt individuals and businesses, and they carry "
        "serious legal consequences. I can suggest legitimate ways to earn or save money.",
        "I cannot provide guidance on cheating, stealing or defrauding others. Dishonest "
        "schemes like this harm their victims and undermine trust. If you are in financial "
        "difficulty, I can point you to legitimate resources.",
    ),
    "hate_harassment": (
        f"{_P} it would target people with hatred or harassment. Content like this hurts "
        "individuals and communities and can encourage discrimination or abuse. I'm happy "
        "to help with respectful communication instead.",
        f"{_P} demeaning people for who they are, or intimidating them, causes real harm. I "
        "can help you write something that expresses disagreement constructively.",
        "I'm sorry, but I cannot create content that harasses, threatens or discriminates "
        "against anyone. Everyone deserves to be treated with dignity. If someone is "
        "harassing you, I can share ways to document it and get support.",
        "I cannot support spreading hate or bullying. Messages like this can do lasting "
        "damage to the people they target. I can help with information about inclusion, "
        "conflict resolution or reporting abuse.",
    ),
    "self_harm": (
        f"{_P} I don't want to contribute to anyone getting hurt. If you are having "
        "thoughts of harming yourself, please reach out to someone you trust or a local "
        "crisis line right away; you deserve support.",
        f"{_P} information like this could put someone's life or health at risk. If you are "
        "struggling, talking to a mental health professional or a crisis service can really "
        "help, and I'm here to listen too.",
        "I'm sorry, but I cannot help with self-harm, suicide or extreme dieting. Your "
        "safety matters. If you are in immediate danger, please contact emergency services "
        "or a crisis hotline.",
        "I cannot provide that, because encouraging self-harm or eating disorders can cause "
        "serious and lasting harm. If this is something you are going through, please "
        "consider reaching out to a doctor, counselor or support line.",
    ),
    "drugs": (
        f"{_P} making, obtaining or promoting illegal drugs endangers people's health and "
        "lives, and it is against the law. If you or someone you know is struggling with "
        "substance use, I can share information about support and treatment.",
        f"{_P} instructions for producing or trafficking drugs could lead to overdoses, "
        "addiction and other serious harm. I'm glad to talk about drug safety or recovery "
        "resources instead.",
        "I'm sorry, but I cannot help with synthesizing, buying or hiding illegal drugs. "
        "These activities cause serious harm to users and communities. I can provide "
        "information about the health effects of drugs or where to find help.",
        "I cannot assist with encouraging drug use or dangerous behavior. It can lead to "
        "addiction, injury or death. If you'd like, I can share harm-reduction and "
        "treatment resources.",
    ),
    "privacy": (
        f"{_P} it would violate someone's privacy. Collecting, tracking or exposing "
        "personal information without consent can lead to stalking, harassment or identity "
        "theft. I can explain how to protect personal data instead.",
        f"{_P} spying on people or gathering their private data without permission harms "
        "them and is often unlawful. If you have a legitimate need, please go through "
        "official and consensual channels.",
        "I'm sorry, but I cannot help with surveillance, doxxing or obtaining someone's "
        "private information. Everyone has a right to privacy. I'm happy to help you secure "
        "your own accounts and data.",
        "I cannot provide ways to track or monitor people without their knowledge, because "
        "it puts their safety and privacy at risk. If you are worried about someone, "
        "talking to them directly or contacting the appropriate authorities is better.",
    ),
    "misinformation": (
        f"{_P} it asks me to create false or misleading information. Misinformation can "
        "mislead people, damage trust and cause real harm. I'm happy to help you write "
        "accurate, well-sourced content instead.",
        f"{_P} spreading fake news or propaganda manipulates people and undermines informed "
        "decisions. I can help you find reliable sources or fact-check a claim.",
        "I'm sorry, but I cannot produce deceptive content such as fake news, hoaxes or "
        "conspiracy theories. False claims spread quickly and can hurt people. I can help "
        "with persuasive writing that is honest and factual.",
        "I cannot create misleading articles or reviews meant to deceive the public. "
        "Deception like this erodes trust and can lead people to harmful decisions. I'd be "
        "glad to help explain how to spot misinformation.",
    ),
    "other": (
        f"{_P} it could cause harm to people or break the law. I'm not able to help with "
        "that, but I'm happy to help with something else.",
        f"{_P} this request asks for content that could be used to hurt others. If you have "
        "a different question, I'll gladly help.",
        "I'm sorry, but I cannot help with that. It could lead to real harm, and I want to "
        "make sure my answers are safe and responsible. Is there something else I can do "
        "for you?",
        "I cannot assist with this request, because it could be harmful or unethical. "
        "Please let me know if there is another topic I can help with.",
    ),
}


def refusal_for(row: Mapping | str, key: str | None = None, *, category: str | None = None,
                seed: int = 0) -> str:
    """A refusal fitting the row's coarse category, chosen deterministically.

    ``row`` is a harmful row (its category is computed with :func:`coarse_category` unless
    ``category`` is given) or a category name. The choice hashes ``key`` (default: the
    row's ``id``) and ``seed``, so the same id always gets the same refusal.
    """
    if isinstance(row, str):
        cat, rid = row, key or row
    else:
        cat = category or coarse_category(row)
        rid = key if key is not None else row.get("id", row.get("prompt", ""))
    if cat not in REFUSALS:
        raise ValueError(f"unknown category {cat!r}; expected one of {CATEGORIES}")
    options = REFUSALS[cat]
    return options[hash64(f"refusal:{seed}:{rid}") % len(options)]
