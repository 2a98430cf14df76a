-- Optional one-sentence icebreakers for final matches (event setting, off by default).
-- Kept apart from user_matches: writing them never blocks or fails saving a list, and a
-- pair keeps its sentence until either profile changes (pair_hash).
ALTER TABLE events ADD COLUMN icebreakers boolean NOT NULL DEFAULT false;

CREATE TABLE icebreakers (
    event_id           bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    profile_id         bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    matched_profile_id bigint NOT NULL REFERENCES profiles (id) ON DELETE CASCADE,
    pair_hash          text NOT NULL,
    text               text NOT NULL CHECK (length(text) BETWEEN 1 AND 500),
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, profile_id, matched_profile_id)
);
CREATE INDEX icebreakers_matched_idx ON icebreakers (matched_profile_id);
