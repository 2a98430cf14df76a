-- The exposure correction (docs/architecture.md, "Exposure correction"): an event may rank
-- its lists by the hubness-corrected score s' instead of s. Both settings change every
-- list, so the settings trigger re-matches the event when either changes.
ALTER TABLE events
    ADD COLUMN exposure_correction text NOT NULL DEFAULT 'none'
        CONSTRAINT events_exposure_correction_check
        CHECK (exposure_correction IN ('none', 'hubness')),
    ADD COLUMN hubness_m integer NOT NULL DEFAULT 10
        CONSTRAINT events_hubness_m_check CHECK (hubness_m BETWEEN 1 AND 50);

-- As in 0003, with the two new columns; SECURITY DEFINER and search_path repeated (0010).
CREATE OR REPLACE FUNCTION mm_events_after_update() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = public, pg_temp
AS $$
BEGIN
    IF (OLD.k, OLD.exclude_same_company, OLD.weight_interests, OLD.weight_complement,
        OLD.weight_bio, OLD.embedder, OLD.exposure_correction, OLD.hubness_m)
       IS DISTINCT FROM
       (NEW.k, NEW.exclude_same_company, NEW.weight_interests, NEW.weight_complement,
        NEW.weight_bio, NEW.embedder, NEW.exposure_correction, NEW.hubness_m) THEN
        PERFORM mm_enqueue(NEW.id,
                           ARRAY(SELECT a.profile_id FROM attendees a
                                  WHERE a.event_id = NEW.id AND a.active),
                           0::smallint, 'settings_changed');
    END IF;
    RETURN NULL;
END
$$;

-- As in 0003, plus: under the exposure correction a leaver also changes r of everyone whose
-- best m held them, hence scores on lists that never named the leaver. When no list named
-- them (nobody re-queued), one remaining attendee is queued so that a worker runs the
-- event and repairs those lists (the worker's batch brings every changed row up to date).
CREATE OR REPLACE FUNCTION mm_handle_departure(p_event_id bigint, p_profile_id bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    owners bigint[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM events WHERE id = p_event_id) THEN
        RETURN;  -- the whole event is being deleted
    END IF;
    PERFORM pg_advisory_xact_lock(mm_event_lock_key(p_event_id));

    WITH removed AS (
        DELETE FROM user_matches m
         WHERE m.event_id = p_event_id
           AND (m.profile_id = p_profile_id OR m.matched_profile_id = p_profile_id)
        RETURNING m.profile_id
    )
    SELECT array_agg(DISTINCT r.profile_id) INTO owners
      FROM removed r
     WHERE r.profile_id <> p_profile_id;

    UPDATE matchmaking_jobs SET lists_version = lists_version + 1, updated_at = now()
     WHERE event_id = p_event_id;
    -- The leaver's own pending work is moot now.
    DELETE FROM matchmaking_queue
     WHERE event_id = p_event_id AND profile_id = p_profile_id AND status = 'pending';

    IF owners IS NULL
       AND EXISTS (SELECT 1 FROM events e
                    WHERE e.id = p_event_id AND e.exposure_correction = 'hubness') THEN
        owners := ARRAY(SELECT a.profile_id FROM attendees a
                         WHERE a.event_id = p_event_id AND a.active
                           AND a.profile_id <> p_profile_id
                         ORDER BY a.profile_id LIMIT 1);
    END IF;

    IF owners IS NOT NULL THEN
        PERFORM mm_enqueue(p_event_id,
                           ARRAY(SELECT a.profile_id FROM attendees a
                                  WHERE a.event_id = p_event_id AND a.active
                                    AND a.profile_id = ANY (owners)
                                    AND a.profile_id <> p_profile_id
                                    -- owners deleted by the same statement (cascade)
                                    AND EXISTS (SELECT 1 FROM profiles p
                                                 WHERE p.id = a.profile_id)),
                           1::smallint, 'neighbour_left');
    END IF;
END
$$;
