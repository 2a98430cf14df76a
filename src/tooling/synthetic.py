"""Realistic synthetic attendees for the demo and benchmarks, deterministic by seed.

Roles have complementary seeking/offering tags (founders seek funding that investors offer,
recruiters seek engineers who seek jobs ...), written in varied surface forms ("investors",
"investment", "Funding") so that the stemmer, not exact spelling, decides what matches.
Profiles are generated from one random stream in id order, so the first m profiles of
generate_profiles(n) equal generate_profiles(m) for the same seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from core.models import Profile

# Each inner tuple is one need or offer; its entries are interchangeable spellings of it.
Variants = tuple[str, ...]


@dataclass(frozen=True)
class Role:
    name: str
    weight: int  # relative frequency among attendees
    titles: tuple[str, ...]
    seeking: tuple[Variants, ...]
    offering: tuple[Variants, ...]
    affinity: tuple[str, ...]  # interests this role picks more often
    goal: str  # bio phrase: "... and {goal}."
    employer: str = "company"  # "company", "university" or "maybe" (often none)
    # In seeking and offering, the first group is the role's defining need or offer and
    # is always present; the others are sampled.


FUNDING_SOUGHT = ("seed funding", "Seed funding", "funding", "Funding", "investment", "investors")
FUNDING_OFFERED = ("seed funding", "Seed Funding", "funding", "investment", "seed investment")
ENGINEERS = ("engineers", "software engineers", "Engineers", "engineering talent")
JOBS = ("job opportunities", "jobs", "Job opportunities", "job offers")
MENTORSHIP = ("mentorship", "mentors", "Mentorship", "mentoring")
ADVISORS = ("advisors", "advisor", "advisory board")
DESIGNERS = ("designers", "product designers", "Designers")
CUSTOMERS = ("customers", "early customers", "clients", "pilot customers")
INTRODUCTIONS = ("introductions", "warm introductions", "network")
PARTNERSHIPS = ("partnerships", "partners", "strategic partnerships")
STARTUPS = ("startups", "Startups", "early-stage startups")
ENGINEERING = ("engineering", "software engineering", "Engineering", "engineering skills")
DESIGN = ("design", "product design", "UX design", "Design")
DATA_SCIENCE = ("data science", "machine learning", "data analysis")
CAREER_ADVICE = ("career advice", "career coaching")
COLLABORATORS = ("research collaborators", "collaborators")
MARKETING = ("marketing", "growth marketing", "Marketing")
SALES = ("sales", "sales strategy", "Sales")
GTM = ("go-to-market strategy", "GTM strategy")
PRODUCT = ("product strategy", "product management")
USER_RESEARCH = ("user research", "user interviews")
BETA_TESTERS = ("beta testers", "user feedback")
INTERNSHIPS = ("internships", "internship", "Internships")
DATASETS = ("datasets", "data sets", "data partners")
DEAL_FLOW = ("deal flow", "Deal flow")
TECH_ADVICE = ("technical advice", "technical mentorship")
FUNDRAISING_ADVICE = ("fundraising advice", "pitch feedback")

ROLES: tuple[Role, ...] = (
    Role(
        "founder",
        14,
        ("Founder & CEO", "Co-founder", "Founder", "Co-founder & CTO", "CEO & Co-founder"),
        (
            FUNDING_SOUGHT,
            ENGINEERS,
            ADVISORS,
            DESIGNERS,
            CUSTOMERS,
            ("co-founder", "cofounder", "technical co-founder"),
        ),
        (
            JOBS,
            ("equity",),
            ("startup experience", "founder experience"),
            ("pilot projects", "beta access"),
            ("early-stage startup", "deal flow"),
        ),
        ("startups", "SaaS", "fintech", "AI", "climate tech", "fundraising"),
        "to raise a seed round and hire our first engineers",
    ),
    Role(
        "investor",
        8,
        ("Partner", "Angel Investor", "Principal", "Venture Partner", "Investment Associate"),
        (STARTUPS, DEAL_FLOW, ("founders", "technical founders"), ("co-investors",)),
        (
            FUNDING_OFFERED,
            MENTORSHIP,
            INTRODUCTIONS,
            FUNDRAISING_ADVICE,
            ("co-investment", "co-investing"),
        ),
        ("venture capital", "startups", "fintech", "AI", "climate tech", "SaaS"),
        "to meet ambitious founders before their seed round",
    ),
    Role(
        "software engineer",
        18,
        (
            "Software Engineer",
            "Senior Software Engineer",
            "Backend Engineer",
            "Full-stack Developer",
            "Staff Engineer",
            "Frontend Engineer",
        ),
        (JOBS, MENTORSHIP, ("open source collaborators", "side projects"), STARTUPS),
        (
            ENGINEERING,
            ("code review", "code reviews"),
            TECH_ADVICE,
            ("open source",),
            ("referrals", "job referrals"),
            ("open to co-founding", "co-founder potential"),
        ),
        ("devtools", "open source", "cloud computing", "Python", "Rust", "distributed systems"),
        "to find a team building something meaningful",
    ),
    Role(
        "recruiter",
        6,
        ("Technical Recruiter", "Talent Partner", "Head of Talent", "Recruiting Lead"),
        (ENGINEERS, DESIGNERS, ("data scientists",), ("product managers",)),
        (
            JOBS,
            CAREER_ADVICE,
            ("salary insights", "interview preparation"),
            ("internships", "internship programs"),
        ),
        ("future of work", "HR tech", "diversity and inclusion", "remote work"),
        "to connect great people with teams that are hiring",
    ),
    Role(
        "job seeker",
        10,
        ("Open to work", "Career changer", "Bootcamp graduate", "Looking for my next role"),
        (JOBS, MENTORSHIP, CAREER_ADVICE, ("referrals", "introductions")),
        (
            ("engineering", "software engineering", "design", "marketing", "data analysis"),
            ("fresh perspective",),
            ("volunteering",),
            ("freelance help", "project work"),
        ),
        ("future of work", "edtech", "web development", "remote work"),
        "to land my next role on a great team",
        employer="maybe",
    ),
    Role(
        "designer",
        7,
        ("Product Designer", "UX Designer", "Design Lead", "Brand Designer", "UI/UX Designer"),
        (JOBS, ("freelance clients", "clients"), STARTUPS, ("design feedback",)),
        (DESIGN, ("design reviews", "design feedback"), USER_RESEARCH, ("branding",)),
        ("design systems", "accessibility", "UX research", "creative tools"),
        "to work with teams that care about craft",
    ),
    Role(
        "product manager",
        8,
        ("Product Manager", "Senior Product Manager", "Head of Product", "Group PM"),
        (BETA_TESTERS, DESIGNERS, ENGINEERS, ("product mentorship",), JOBS),
        (PRODUCT, USER_RESEARCH, ("roadmapping advice",), MENTORSHIP),
        ("product management", "SaaS", "growth", "AI", "marketplaces"),
        "to learn how other teams ship and measure products",
    ),
    Role(
        "marketer",
        6,
        ("Marketing Manager", "Head of Growth", "Growth Marketer", "CMO", "Content Lead"),
        (CUSTOMERS, PARTNERSHIPS, STARTUPS),
        (MARKETING, GTM, ("content marketing", "content strategy"), ("brand strategy",)),
        ("growth", "marketing", "creator economy", "e-commerce", "community building"),
        "to help startups find their first thousand users",
    ),
    Role(
        "data scientist",
        7,
        (
            "Data Scientist",
            "Machine Learning Engineer",
            "Senior Data Scientist",
            "ML Researcher",
            "Analytics Lead",
        ),
        (DATASETS, JOBS, COLLABORATORS, MENTORSHIP),
        (DATA_SCIENCE, ("analytics", "data analytics"), TECH_ADVICE, MENTORSHIP),
        ("AI", "machine learning", "data engineering", "MLOps", "generative AI", "NLP"),
        "to apply machine learning to real problems",
    ),
    Role(
        "sales lead",
        5,
        ("Head of Sales", "Account Executive", "Sales Director", "Business Development Lead"),
        (CUSTOMERS, PARTNERSHIPS, INTRODUCTIONS),
        (SALES, GTM, ("customer introductions", "client introductions"), PARTNERSHIPS),
        ("SaaS", "enterprise software", "B2B sales", "fintech"),
        "to build partnerships that grow revenue",
    ),
    Role(
        "student",
        6,
        ("Computer Science Student", "MBA Candidate", "PhD Student", "Design Student"),
        (INTERNSHIPS, MENTORSHIP, CAREER_ADVICE, JOBS),
        (
            ("research assistance",),
            ("fresh perspective",),
            ("volunteering", "volunteers"),
            ENGINEERING,
        ),
        ("AI", "edtech", "climate tech", "open source", "robotics"),
        "to find an internship and learn from people in the industry",
        employer="university",
    ),
    Role(
        "researcher",
        4,
        ("Research Scientist", "Postdoctoral Researcher", "Professor", "Research Engineer"),
        (
            COLLABORATORS,
            ("research funding", "grants", "funding"),
            DATASETS,
            ("industry partners", "industry partnerships"),
        ),
        (("research expertise", "research collaboration"), TECH_ADVICE, DATA_SCIENCE, MENTORSHIP),
        ("AI", "robotics", "quantum computing", "biotech", "climate tech", "neuroscience"),
        "to turn research into products that people use",
        employer="university",
    ),
    Role(
        "advisor",
        3,
        ("Startup Advisor", "Fractional CTO", "Executive Coach", "Board Member"),
        (STARTUPS, ("founders", "first-time founders")),
        (
            MENTORSHIP,
            ("advising", "startup advising", "advisory support"),
            INTRODUCTIONS,
            FUNDRAISING_ADVICE,
        ),
        ("startups", "leadership", "fundraising", "SaaS"),
        "to help first-time founders avoid the mistakes I made",
    ),
    Role(
        "innovation lead",
        3,
        (
            "Head of Innovation",
            "Director of Digital Transformation",
            "Procurement Lead",
            "Corporate Venture Lead",
        ),
        (STARTUPS, PARTNERSHIPS, TECH_ADVICE),
        (
            ("pilot customer", "pilot projects", "enterprise customers", "clients"),
            PARTNERSHIPS,
            ("industry datasets", "datasets"),
            ("research grants", "grants"),
        ),
        ("enterprise software", "AI", "sustainability", "cybersecurity", "mobility"),
        "to find startups we can pilot with this year",
    ),
    Role(
        "engineering manager",
        4,
        ("Engineering Manager", "VP of Engineering", "CTO", "Director of Engineering"),
        (ENGINEERS, ("engineering leaders", "senior engineers"), ("technical advisors",)),
        (JOBS, MENTORSHIP, TECH_ADVICE),
        ("engineering management", "devtools", "cloud computing", "leadership"),
        "to grow a strong engineering team",
    ),
)

INTEREST_POOL: tuple[str, ...] = (
    "AI",
    "machine learning",
    "generative AI",
    "NLP",
    "computer vision",
    "MLOps",
    "climate tech",
    "clean energy",
    "sustainability",
    "fintech",
    "payments",
    "web3",
    "crypto",
    "healthtech",
    "biotech",
    "digital health",
    "devtools",
    "open source",
    "cloud computing",
    "cybersecurity",
    "distributed systems",
    "data engineering",
    "Python",
    "Rust",
    "TypeScript",
    "web development",
    "mobile apps",
    "edtech",
    "future of work",
    "remote work",
    "HR tech",
    "e-commerce",
    "marketplaces",
    "SaaS",
    "enterprise software",
    "B2B sales",
    "growth",
    "marketing",
    "creator economy",
    "community building",
    "startups",
    "venture capital",
    "fundraising",
    "product management",
    "design systems",
    "accessibility",
    "UX research",
    "creative tools",
    "robotics",
    "hardware",
    "IoT",
    "quantum computing",
    "neuroscience",
    "space tech",
    "mobility",
    "proptech",
    "agritech",
    "foodtech",
    "gaming",
    "leadership",
    "engineering management",
    "diversity and inclusion",
)

_COMPANY_STEMS = (
    "Acme",
    "Northwind",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Vandelay",
    "Stark",
    "Wayne",
    "Cyberdyne",
    "Soylent",
    "Tyrell",
    "Aperture",
    "Massive",
    "Monarch",
    "Oscorp",
    "Pied Piper",
    "Dunder",
    "Wonka",
    "Gringotts",
    "Blue Harbor",
    "Redwood",
    "Silverline",
    "Brightpath",
    "Cobalt",
    "Lumen",
    "Nimbus",
    "Quanta",
    "Helix",
    "Vertex",
    "Orbit",
    "Pioneer",
    "Summit",
    "Evergreen",
    "Beacon",
    "Atlas",
    "Nova",
    "Zenith",
    "Horizon",
    "Kestrel",
    "Juniper",
    "Meridian",
    "Halcyon",
    "Foxglove",
)
_COMPANY_SUFFIXES = ("Labs", "AI", "Systems", "Ventures", "Capital", "Health", "Analytics")
# Deterministic pairing of stems and suffixes; together with the universities ~150 names.
COMPANIES: tuple[str, ...] = (
    *(
        f"{name} {_COMPANY_SUFFIXES[(i * 3 + j) % len(_COMPANY_SUFFIXES)]}"
        for i, name in enumerate(_COMPANY_STEMS)
        for j in range(3)
    ),
    "Parallax",
    "Bytewise",
    "Fernhill",
    "Copperleaf",
    "Tidewater",
    "Moonshot Robotics",
    "Greenfield Energy",
    "Paperclip",
    "Kiteworks Studio",
    "Lighthouse Bank",
)
UNIVERSITIES: tuple[str, ...] = (
    "State University",
    "Institute of Technology",
    "City College",
    "Polytechnic University",
    "University of the North",
    "Metropolitan University",
    "Lakeside University",
    "Riverside College",
    "National Research Lab",
    "Open University",
)

FIRST_NAMES = (
    "Ada",
    "Alan",
    "Amara",
    "Ana",
    "Arjun",
    "Beatriz",
    "Ben",
    "Camille",
    "Chen",
    "Chloe",
    "Daniel",
    "Diego",
    "Elena",
    "Emeka",
    "Fatima",
    "Felix",
    "Grace",
    "Hana",
    "Hugo",
    "Ines",
    "Ivan",
    "Jamal",
    "Jin",
    "Julia",
    "Kai",
    "Kofi",
    "Lars",
    "Leila",
    "Liam",
    "Lucia",
    "Maya",
    "Mateo",
    "Mei",
    "Mohammed",
    "Nadia",
    "Noah",
    "Olga",
    "Omar",
    "Priya",
    "Rafael",
    "Rosa",
    "Sam",
    "Sara",
    "Sofia",
    "Tariq",
    "Theo",
    "Valentina",
    "Wei",
    "Yara",
    "Zoe",
)
LAST_NAMES = (
    "Adeyemi",
    "Anderson",
    "Bauer",
    "Becker",
    "Chen",
    "Costa",
    "Dubois",
    "Eriksson",
    "Fernandez",
    "Garcia",
    "Gupta",
    "Hansen",
    "Hoffmann",
    "Ibrahim",
    "Ito",
    "Jensen",
    "Kim",
    "Kowalski",
    "Kumar",
    "Larsen",
    "Lee",
    "Lopez",
    "Martin",
    "Mensah",
    "Moreau",
    "Müller",
    "Nakamura",
    "Nguyen",
    "Novak",
    "Okafor",
    "Olsen",
    "Patel",
    "Petrov",
    "Rossi",
    "Santos",
    "Schmidt",
    "Silva",
    "Singh",
    "Smith",
    "Tanaka",
    "Vargas",
    "Wang",
    "Weber",
    "Williams",
    "Xu",
    "Yilmaz",
    "Zhang",
    "O'Brien",
    "Ramírez",
    "Søndergaard",
)

_OPENERS = (
    "{title}{at_company}, focused on {i1}.",
    "I work as {a_role}, mostly on {i1} and {i2}.",
    "{title} with a background in {i1}.",
    "Passionate about {i1}, {i2} and {i3}.",
)
_GOALS = (
    "Here {goal}.",
    "Looking to meet people who can help with {s1} and {s2}.",
    "At this event I hope {goal}.",
    "Always keen to talk about {i1}, and hoping to find {s1}.",
)
_OFFERS = (
    "Happy to offer {o1} to anyone working in {i2}.",
    "I can help with {o1} and {o2}.",
    "Ask me about {o1}.",
)

_ROLE_WEIGHTS = tuple(role.weight for role in ROLES)
_ROLE_BY_TITLE = {title: role.name for role in ROLES for title in role.titles}


def _pick_tags(rng: random.Random, groups: tuple[Variants, ...], low: int, high: int) -> list[str]:
    """The role's primary group (listed first) always, plus a random few of the others."""
    primary, others = groups[0], groups[1:]
    count = rng.randint(min(low, len(groups)), min(high, len(groups)))
    chosen = [primary, *rng.sample(others, count - 1)]
    return [rng.choice(variants) for variants in chosen]


def _pick_interests(rng: random.Random, role: Role) -> list[str]:
    count = rng.randint(2, 6)
    from_role = rng.sample(role.affinity, min(len(role.affinity), rng.randint(1, 2)))
    chosen = list(from_role)
    while len(chosen) < count:
        topic = rng.choice(INTEREST_POOL)
        if topic not in chosen:
            chosen.append(topic)
    # Occasional casing variants; the model dedupes case-insensitively anyway.
    return [t.lower() if rng.random() < 0.15 else t for t in chosen]


def _pick_company(rng: random.Random, role: Role) -> str:
    if role.employer == "university":
        return rng.choice(UNIVERSITIES)
    if role.employer == "maybe" and rng.random() < 0.6:
        return ""
    return rng.choice(COMPANIES)


def _bio(
    rng: random.Random,
    role: Role,
    *,
    title: str,
    company: str,
    interests: list[str],
    seeking: list[str],
    offering: list[str],
) -> str:
    slots = {
        "title": title,
        "at_company": f" at {company}" if company else "",
        "a_role": f"{'an' if role.name[0] in 'aeiou' else 'a'} {role.name}",
        "goal": role.goal,
        "i1": interests[0],
        "i2": interests[1 % len(interests)],
        "i3": interests[2 % len(interests)],
        "s1": seeking[0] if seeking else "new ideas",
        "s2": seeking[1] if len(seeking) > 1 else "new connections",
        "o1": offering[0] if offering else "feedback",
        "o2": offering[1] if len(offering) > 1 else "introductions",
    }
    sentences = [rng.choice(_OPENERS)]
    n_sentences = rng.randint(1, 3)
    if n_sentences >= 2:
        sentences.append(rng.choice(_GOALS))
    if n_sentences == 3:
        sentences.append(rng.choice(_OFFERS))
    return " ".join(s.format(**slots) for s in sentences)


def generate_profiles(n: int, seed: int = 42, id_prefix: str = "u") -> list[Profile]:
    """n validated profiles with ids f"{id_prefix}{i:06d}", i = 0 .. n-1."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)  # noqa: S311 -- reproducible test data, not security
    profiles = []
    for i in range(n):
        role = rng.choices(ROLES, weights=_ROLE_WEIGHTS)[0]
        title = rng.choice(role.titles)
        company = _pick_company(rng, role)
        interests = _pick_interests(rng, role)
        seeking = _pick_tags(rng, role.seeking, 2, 4)
        offering = _pick_tags(rng, role.offering, 1, 3)
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        bio = _bio(
            rng,
            role,
            title=title,
            company=company,
            interests=interests,
            seeking=seeking,
            offering=offering,
        )
        profiles.append(
            Profile(
                user_id=f"{id_prefix}{i:06d}",
                name=name,
                company=company,
                title=title,
                bio=bio,
                interests=interests,
                seeking=seeking,
                offering=offering,
            )
        )
    return profiles


def role_of(profile: Profile) -> str | None:
    """The role whose title list contains the profile's title (for benchmarks and tests)."""
    return _ROLE_BY_TITLE.get(profile.title)
