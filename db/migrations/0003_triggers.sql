-- Triggers that turn any write (our API, an import, the app's own backend) into queued
-- work, so no writer has to remember to enqueue.

-- Matching-relevant profile fields: a change re-embeds the profile and re-matches it.
-- name is display-only; a name-only edit enqueues nothing.
CREATE FUNCTION mm_profile_relevant_change(o profiles, n profiles) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT (o.company, o.title, o.bio, o.interests, o.seeking, o.offering)
           IS DISTINCT FROM (n.company, n.title, n.bio, n.interests, n.seeking, n.offering)
$$;

CREATE FUNCTION mm_profiles_before_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF mm_profile_relevant_change(OLD, NEW) THEN
        NEW.change_xid := pg_current_xact_id();
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER profiles_before_update BEFORE UPDATE ON profiles
    FOR EACH ROW EXECUTE FUNCTION mm_profiles_before_update();

CREATE FUNCTION mm_profiles_after_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF mm_profile_relevant_change(OLD, NEW) THEN
        PERFORM mm_enqueue(a.event_id, ARRAY[NEW.id], 2::smallint, 'profile_update')
           FROM attendees a
          WHERE a.profile_id = NEW.id AND a.active;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER profiles_after_update AFTER UPDATE ON profiles
    FOR EACH ROW EXECUTE FUNCTION mm_profiles_after_update();

-- A departure (leave, or the attendee row deleted): the leaver disappears from every list
-- at once and whoever had them is re-queued to find a replacement. Holds the event lock so
-- a worker batch cannot write the leaver back into a list concurrently.
CREATE FUNCTION mm_handle_departure(p_event_id bigint, p_profile_id bigint) RETURNS void
LANGUAGE plpgsql
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

CREATE FUNCTION mm_attendees_after_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.active THEN
        PERFORM mm_enqueue(NEW.event_id, ARRAY[NEW.profile_id], 3::smallint, 'join');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER attendees_after_insert AFTER INSERT ON attendees
    FOR EACH ROW EXECUTE FUNCTION mm_attendees_after_insert();

CREATE FUNCTION mm_attendees_before_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.active IS DISTINCT FROM NEW.active THEN
        NEW.change_xid := pg_current_xact_id();
        IF NEW.active THEN
            NEW.joined_at := now();
            NEW.left_at := NULL;
        ELSE
            NEW.left_at := now();
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER attendees_before_update BEFORE UPDATE ON attendees
    FOR EACH ROW EXECUTE FUNCTION mm_attendees_before_update();

CREATE FUNCTION mm_attendees_after_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.active AND NOT NEW.active THEN
        PERFORM mm_handle_departure(NEW.event_id, NEW.profile_id);
    ELSIF NEW.active AND NOT OLD.active THEN
        PERFORM mm_enqueue(NEW.event_id, ARRAY[NEW.profile_id], 3::smallint, 'join');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER attendees_after_update AFTER UPDATE ON attendees
    FOR EACH ROW EXECUTE FUNCTION mm_attendees_after_update();

CREATE FUNCTION mm_attendees_before_delete() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF OLD.active THEN
        PERFORM mm_handle_departure(OLD.event_id, OLD.profile_id);
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER attendees_before_delete BEFORE DELETE ON attendees
    FOR EACH ROW EXECUTE FUNCTION mm_attendees_before_delete();

-- "No thanks" excludes the pair both ways: both lists are recomputed.
CREATE FUNCTION mm_dismissals_after_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM mm_enqueue(NEW.event_id,
                       ARRAY(SELECT a.profile_id FROM attendees a
                              WHERE a.event_id = NEW.event_id AND a.active
                                AND a.profile_id IN (NEW.profile_id, NEW.dismissed_profile_id)),
                       2::smallint, 'dismissal');
    RETURN NULL;
END
$$;

CREATE TRIGGER dismissals_after_insert AFTER INSERT ON dismissals
    FOR EACH ROW EXECUTE FUNCTION mm_dismissals_after_insert();

-- Settings that change every score or the list length: re-match the whole event.
CREATE FUNCTION mm_events_after_update() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF (OLD.k, OLD.exclude_same_company, OLD.weight_interests, OLD.weight_complement,
        OLD.weight_bio, OLD.embedder)
       IS DISTINCT FROM
       (NEW.k, NEW.exclude_same_company, NEW.weight_interests, NEW.weight_complement,
        NEW.weight_bio, NEW.embedder) THEN
        PERFORM mm_enqueue(NEW.id,
                           ARRAY(SELECT a.profile_id FROM attendees a
                                  WHERE a.event_id = NEW.id AND a.active),
                           0::smallint, 'settings_changed');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_after_update AFTER UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION mm_events_after_update();
