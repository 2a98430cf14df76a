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
