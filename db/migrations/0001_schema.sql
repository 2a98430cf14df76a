-- Core tables: events, user-level profiles, membership, vectors, dismissals, lists.
--
-- change_xid columns record the transaction that last changed a row in a way that matters
-- for matching. Workers keep an event's matrices in memory and refresh them incrementally
-- with "change_xid >= the xmin of my previous snapshot": unlike a sequence number, an xid
-- watermark cannot skip a row whose transaction committed late.

CREATE TABLE events (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code                 text NOT NULL UNIQUE CHECK (code ~ '^[A-Za-z0-9-]{3,64}$'),
    name                 text NOT NULL DEFAULT '',
    k                    smallint NOT NULL DEFAULT 3 CHECK (k BETWEEN 1 AND 10),
    exclude_same_company boolean NOT NULL DEFAULT true,
    weight_interests     double precision NOT NULL DEFAULT 1.0 CHECK (weight_interests >= 0),
    weight_complement    double precision NOT NULL DEFAULT 1.0 CHECK (weight_complement >= 0),
    weight_bio           double precision NOT NULL DEFAULT 0.5 CHECK (weight_bio >= 0),
    embedder             text NOT NULL DEFAULT 'local',
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (weight_interests + weight_complement + weight_bio > 0)
);

CREATE TABLE profiles (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text NOT NULL UNIQUE CHECK (user_id ~ '^[A-Za-z0-9_.:@-]{1,128}$'),
    name        text NOT NULL DEFAULT '',
    company     text NOT NULL DEFAULT '',
    title       text NOT NULL DEFAULT '',
    bio         text NOT NULL DEFAULT '' CHECK (length(bio) <= 4000),
    interests   text[] NOT NULL DEFAULT '{}' CHECK (cardinality(interests) <= 50),
    seeking     text[] NOT NULL DEFAULT '{}' CHECK (cardinality(seeking) <= 50),
    offering    text[] NOT NULL DEFAULT '{}' CHECK (cardinality(offering) <= 50),
    change_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX profiles_change_xid_idx ON profiles (change_xid);

CREATE TABLE attendees (
    event_id    bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    profile_id  bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    active      boolean NOT NULL DEFAULT true,
    joined_at   timestamptz NOT NULL DEFAULT now(),
    left_at     timestamptz,
    change_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (event_id, profile_id)
);
CREATE INDEX attendees_profile_idx ON attendees (profile_id);  -- events of a user; FK
CREATE INDEX attendees_change_xid_idx ON attendees (event_id, change_xid);

-- One vector per (profile, embedder key): all events using the same embedder share it.
-- vector holds the quantised int16 blocks [interests | seeking | offering | bio].
CREATE TABLE profile_vectors (
    profile_id   bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    embedder     text NOT NULL,
    content_hash text NOT NULL,
    dims         integer NOT NULL CHECK (dims > 0),
    vector       bytea NOT NULL CHECK (length(vector) = 2 * dims),
    change_xid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (profile_id, embedder)
);
CREATE INDEX profile_vectors_change_xid_idx ON profile_vectors (embedder, change_xid);

-- "No thanks": excludes the pair both ways within the event.
CREATE TABLE dismissals (
    event_id             bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    profile_id           bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    dismissed_profile_id bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    change_xid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, profile_id, dismissed_profile_id),
    CHECK (profile_id <> dismissed_profile_id)
);
CREATE INDEX dismissals_change_xid_idx ON dismissals (event_id, change_xid);
CREATE INDEX dismissals_dismissed_idx ON dismissals (dismissed_profile_id);  -- FK cascade

CREATE TABLE user_matches (
    event_id           bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    profile_id         bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    rank               smallint NOT NULL CHECK (rank BETWEEN 1 AND 10),
    matched_profile_id bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    score              double precision NOT NULL,
    reasons            jsonb NOT NULL DEFAULT '[]',
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, profile_id, rank),
    CHECK (profile_id <> matched_profile_id)
);
-- Who has X on their list? (departure trigger). Leads with matched_profile_id so the
-- planner never mistakes it for the owner lookup, which must use the primary key.
CREATE INDEX user_matches_matched_idx ON user_matches (matched_profile_id, event_id);
