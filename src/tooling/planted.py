"""Generated events with a planted truth that the embedder never sees (issue 17.4).

Every attendee has a *latent* role (what they seek and what they offer, as concepts such
as ``funding`` or ``engineering``) and one to three latent topics (``climate``,
``health`` ...). Their visible profile is rendered from a vocabulary in which every concept
has several surface forms with different stems ("seed funding", "capital", "venture
financing" ...), some words are shared by related concepts ("talent" by engineering and
design, "energy" by climate and mobility, "security" by cybersecurity and food security),
and generic *hub* words ("AI", "startups", "networking", "partnerships") are used by many
profiles whatever their truth - above all by the share of *generic* profiles, who write
mostly hub words. Noise interests ("coffee", "hiking") carry no truth at all. So
bag-of-words cannot recover the truth exactly: two relevant attendees may share no word,
and two irrelevant ones may share many.

The truth, ``relevant(A, B)``, is symmetric and uses latent attributes only:

    relevant(A, B) = (A seeks a concept B offers  or  B seeks a concept A offers)
                     and A and B share a latent topic

Latent sets are bit masks, so the truth of many pairs is a few numpy operations.
Deterministic by seed; attendees are generated one at a time from one random stream in id
order, so the first m attendees of ``generate_planted(n)`` equal ``generate_planted(m)``
(newcomers of an evaluation are the attendees after the first n of the same stream).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.models import Profile

# --- the latent world ---------------------------------------------------------------------

# Concepts that are sought and offered, each with surface forms of mostly different stems.
# A form may be shared with a related concept (its "related terms").
CONCEPT_FORMS: dict[str, tuple[str, ...]] = {
    "funding": ("seed funding", "capital", "venture financing", "pre-seed round", "investors"),
    "dealflow": ("deal flow", "investment opportunities", "startups to back", "founders"),
    "engineering": (
        "software engineers",
        "developers",
        "engineering talent",
        "technical cofounder",
        "backend expertise",
    ),
    "design": ("product designers", "UX", "design talent", "branding", "UI work"),
    "jobs": ("job opportunities", "open roles", "career move", "employment", "hiring teams"),
    "advice": ("mentorship", "advisors", "guidance", "coaching", "feedback"),
    "customers": ("customers", "pilot budgets", "enterprise buyers", "first clients"),
    "solutions": ("vendors", "new solutions", "startup products", "innovation partners"),
    "research": ("research collaborators", "academic partners", "co-authors", "lab access"),
    "data": ("datasets", "data access", "training data", "analytics"),
}
CONCEPTS: tuple[str, ...] = tuple(CONCEPT_FORMS)

TOPIC_FORMS: dict[str, tuple[str, ...]] = {
    "climate": ("climate tech", "clean energy", "decarbonization", "sustainability", "renewables"),
    "health": ("digital health", "healthcare", "medtech", "biotech", "patient care"),
    "fintech": ("fintech", "payments", "banking", "insurtech", "personal finance"),
    "education": ("edtech", "education", "online learning", "schools", "upskilling"),
    "robotics": ("robotics", "automation", "drones", "hardware", "autonomous systems"),
    "security": ("cybersecurity", "infosec", "privacy", "identity", "threat detection"),
    "gaming": ("gaming", "game development", "esports", "virtual worlds"),
    "mobility": ("mobility", "electric vehicles", "transport", "logistics", "energy storage"),
    "agriculture": ("agtech", "food systems", "farming", "vertical farming", "food security"),
    "media": ("media", "creator economy", "streaming", "publishing", "content"),
}
TOPICS: tuple[str, ...] = tuple(TOPIC_FORMS)

# Words many profiles use regardless of their truth: they make hubs.
HUB_INTERESTS = (
    "AI",
    "startups",
    "innovation",
    "technology",
    "networking",
    "entrepreneurship",
    "SaaS",
    "growth",
    "future of work",
)
HUB_TAGS = ("networking", "collaboration", "partnerships", "opportunities", "connections")
HUB_BIO = (
    "Passionate about AI, startups and innovation.",
    "Always happy to connect with people building the future of technology.",
    "Love networking and growth opportunities in the startup ecosystem.",
)
# Bio sentence frames, several per intent with different words, so that frames are not a
# vocabulary every profile shares.
BIO_FOCUS = ("Working on {}.", "Building in {}.", "Focused on {}.", "My field is {}.")
BIO_SEEK = ("Looking for {}.", "Seeking {}.", "Hoping to meet {}.", "In search of {}.")
BIO_OFFER = ("Happy to help with {}.", "Can offer {}.", "Glad to share {}.", "Bringing {}.")
NOISE_INTERESTS = (
    "coffee",
    "running",
    "travel",
    "photography",
    "books",
    "music",
    "cooking",
    "hiking",
    "chess",
    "yoga",
)


@dataclass(frozen=True)
class LatentRole:
    name: str
    weight: int  # relative frequency
    titles: tuple[str, ...]
    seeks: tuple[str, ...]  # the first is always sought, the others sampled
    offers: tuple[str, ...]  # the first is always offered, the others sampled
    topics: tuple[int, int]  # how many topics (min, max)


ROLES: tuple[LatentRole, ...] = (
    LatentRole(
        "founder",
        16,
        ("Founder", "CEO", "Co-founder", "Founder & CEO"),
        ("funding", "engineering", "design", "customers", "advice"),
        ("dealflow", "jobs", "solutions"),
        (1, 1),
    ),
    LatentRole(
        "investor",
        8,
        ("Partner", "Angel Investor", "Venture Capitalist", "Principal"),
        ("dealflow",),
        ("funding", "advice"),
        (2, 3),
    ),
    LatentRole(
        "engineer",
        16,
        ("Software Engineer", "Developer", "Backend Engineer", "Staff Engineer"),
        ("jobs", "advice", "data"),
        ("engineering",),
        (1, 2),
    ),
    LatentRole(
        "designer",
        8,
        ("Product Designer", "UX Designer", "Design Lead"),
        ("jobs", "customers"),
        ("design",),
        (1, 2),
    ),
    LatentRole(
        "recruiter",
        6,
        ("Recruiter", "Talent Partner", "Head of Talent"),
        ("engineering", "design"),
        ("jobs",),
        (2, 3),
    ),
    LatentRole(
        "researcher",
        8,
        ("Research Scientist", "Professor", "PhD Candidate", "Postdoc"),
        ("data", "research", "funding"),
        ("research", "advice"),
        (1, 2),
    ),
    LatentRole(
        "corporate buyer",
        6,
        ("Innovation Lead", "Head of Procurement", "Corporate Venturing Manager"),
        ("solutions",),
        ("customers", "data"),
        (1, 2),
    ),
    LatentRole(
        "mentor",
        6,
        ("Advisor", "Mentor", "Executive Coach", "Operating Partner"),
        ("dealflow",),
        ("advice",),
        (2, 3),
    ),
    LatentRole(
        "data scientist",
        8,
        ("Data Scientist", "ML Engineer", "Analytics Lead"),
        ("jobs", "data"),
        ("data", "engineering"),
        (1, 2),
    ),
)

GENERIC_SHARE = 0.12  # profiles written mostly in hub words (the observed hubs)
COMPANY_EMPTY_SHARE = 0.25
COMPANY_WORDS = ("Labs", "Systems", "Ventures", "Works", "Group", "Studio", "Capital", "AI")


@dataclass(frozen=True)
class LatentAttendee:
    role: str
    seeks: frozenset[str]
    offers: frozenset[str]
    topics: frozenset[str]
    generic: bool


@dataclass(frozen=True)
class PlantedEvent:
    """Profiles (what the service sees) and the latent attendees behind them (what it
    does not), index for index; ``seeks``/``offers``/``topics`` are the latent sets as bit
    masks for vectorised truth."""

    profiles: list[Profile]
    latent: list[LatentAttendee]
    seeks: np.ndarray[Any, np.dtype[np.int64]]
    offers: np.ndarray[Any, np.dtype[np.int64]]
    topics: np.ndarray[Any, np.dtype[np.int64]]

    def relevant(self, a: int, b: int) -> bool:
        return bool(self.relevant_pairs(np.array([a]), np.array([b]))[0])

    def relevant_pairs(
        self, a: np.ndarray[Any, np.dtype[Any]], b: np.ndarray[Any, np.dtype[Any]]
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """The truth of the pairs (a[i], b[i]), as defined in the module docstring."""
        complementary = ((self.seeks[a] & self.offers[b]) | (self.seeks[b] & self.offers[a])) != 0
        same_topic = (self.topics[a] & self.topics[b]) != 0
        result: np.ndarray[Any, np.dtype[np.bool_]] = complementary & same_topic & (a != b)
        return result

    def index_of(self) -> dict[str, int]:
        return {p.user_id: i for i, p in enumerate(self.profiles)}


def _mask(names: frozenset[str], universe: tuple[str, ...]) -> int:
    return sum(1 << universe.index(name) for name in names)


def _pick_role(rng: random.Random) -> LatentRole:
    return rng.choices(ROLES, weights=[role.weight for role in ROLES])[0]


def _latent(rng: random.Random) -> LatentAttendee:
    role = _pick_role(rng)
    seeks = {role.seeks[0], *(c for c in role.seeks[1:] if rng.random() < 0.4)}
    offers = {role.offers[0], *(c for c in role.offers[1:] if rng.random() < 0.4)}
    topics = set(rng.sample(TOPICS, rng.randint(*role.topics)))
    return LatentAttendee(
        role.name,
        frozenset(seeks),
        frozenset(offers),
        frozenset(topics),
        generic=rng.random() < GENERIC_SHARE,
    )


def _forms(rng: random.Random, forms: tuple[str, ...], most: int) -> list[str]:
    return rng.sample(forms, rng.randint(1, min(most, len(forms))))


def _render(rng: random.Random, user_id: str, person: LatentAttendee, n_companies: int) -> Profile:
    """The visible profile: latent concepts through sampled surface forms, plus hub and
    noise words. Generic profiles name their topics and needs sparingly and hub words a
    lot; everyone else uses a hub word now and then."""
    role = next(r for r in ROLES if r.name == person.role)
    generic = person.generic
    topic_words = [
        form
        for topic in sorted(person.topics)
        for form in _forms(rng, TOPIC_FORMS[topic], 1 if generic else 2)
        if not generic or rng.random() < 0.5
    ]
    hubs = rng.sample(HUB_INTERESTS, rng.randint(3, 5) if generic else rng.randint(0, 1))
    noise = rng.sample(NOISE_INTERESTS, rng.randint(0, 2))
    interests = topic_words + hubs + noise
    if not interests:
        interests = [rng.choice(HUB_INTERESTS)]

    def tags(concepts: frozenset[str]) -> list[str]:
        words = [rng.choice(CONCEPT_FORMS[c]) for c in sorted(concepts)]
        if generic:
            words = words[:1] + rng.sample(HUB_TAGS, rng.randint(2, 3))
        elif rng.random() < 0.25:
            words.append(rng.choice(HUB_TAGS))
        return words

    seeking, offering = tags(person.seeks), tags(person.offers)
    topic_phrase = " and ".join(rng.choice(TOPIC_FORMS[t]) for t in sorted(person.topics))
    sought = rng.choice(CONCEPT_FORMS[rng.choice(sorted(person.seeks))])
    offered = rng.choice(CONCEPT_FORMS[rng.choice(sorted(person.offers))])
    sentences = [
        rng.choice(BIO_FOCUS).format(topic_phrase),
        rng.choice(BIO_SEEK).format(sought),
        rng.choice(BIO_OFFER).format(offered),
    ]
    if generic:
        sentences = [rng.choice(HUB_BIO), rng.choice(HUB_BIO), sentences[rng.randint(0, 2)]]
    company = (
        ""
        if rng.random() < COMPANY_EMPTY_SHARE
        else f"{rng.choice(COMPANY_WORDS)} {rng.randrange(n_companies)}"
    )
    return Profile(
        user_id=user_id,
        name=f"Attendee {user_id}",
        company=company,
        title=rng.choice(role.titles),
        bio=" ".join(sentences),
        interests=interests,
        seeking=seeking,
        offering=offering,
    )


def generate_planted(n: int, seed: int = 0, id_prefix: str = "planted-") -> PlantedEvent:
    """n attendees with their latent truth, deterministic for (n, seed, id_prefix)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)  # noqa: S311 -- reproducible test data, not security
    # Companies: a fixed pool (not depending on n, so prefixes nest), shared by a few each.
    n_companies = 5_000
    profiles, latent = [], []
    for i in range(n):
        person = _latent(rng)
        latent.append(person)
        profiles.append(_render(rng, f"{id_prefix}{i:06d}", person, n_companies))
    return PlantedEvent(
        profiles=profiles,
        latent=latent,
        seeks=np.array([_mask(p.seeks, CONCEPTS) for p in latent], dtype=np.int64),
        offers=np.array([_mask(p.offers, CONCEPTS) for p in latent], dtype=np.int64),
        topics=np.array([_mask(p.topics, TOPICS) for p in latent], dtype=np.int64),
    )


def relevance_base_rate(event: PlantedEvent, samples: int = 200_000, seed: int = 0) -> float:
    """The share of relevant pairs among random distinct pairs (seeded sample): the
    precision a random list would have."""
    n = len(event.profiles)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, samples)
    b = (a + rng.integers(1, n, samples)) % n  # never a itself
    return float(event.relevant_pairs(a, b).mean())
