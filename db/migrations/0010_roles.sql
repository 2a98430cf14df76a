-- Least privilege in the database. Three NOLOGIN group roles:
--
--   matchmaker_owner   owns every table and function; only migrations run as it (the
--                      runner switches to it with SET LOCAL ROLE once it exists).
--   matchmaker_worker  the matchmaker and redrive functions: reads the event data, claims,
--                      completes and fails queue rows through the mm_* functions, writes
--                      vectors, lists, icebreakers, the job row and the batch log.
--   matchmaker_api     the HTTP API: reads and writes events, profiles, attendees and
--                      dismissals, reads lists and status, pauses/resumes jobs, calls the
--                      enqueue/redrive functions. The legacy synchronous trigger runs the
--                      matchmaker inside the API, so the API is also a member of the worker.
--
-- Login users (one per deployed function, created by the migrate function, or by the tests)
-- are members of one group role; they never own anything. Nobody but the owner may touch
-- schema_migrations, run DDL, or delete from user_matches / profile_vectors directly: narrow
-- writes go through SECURITY DEFINER functions with a fixed search_path.
--
-- Tables created by a later migration are owned by matchmaker_owner (the runner creates
-- them as it) and granted to nobody: that migration grants exactly what each role needs.
-- Functions a later migration creates are not executable by PUBLIC (default privileges
-- below); a CREATE OR REPLACE of a function listed here must repeat SECURITY DEFINER and
-- SET search_path, which a replacement otherwise drops.

-- Roles are per cluster: another database of the same server (the tests' template) may
-- have created them already, possibly at the same moment.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['matchmaker_owner', 'matchmaker_worker', 'matchmaker_api']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by a migration of another database
            END;
        END IF;
    END LOOP;
END
$$;

-- The migrating user (the RDS master user; a superuser locally) may act as the owner.
GRANT matchmaker_owner TO CURRENT_USER;
GRANT matchmaker_worker TO matchmaker_api;

-- Nobody creates objects in public but the owner (PostgreSQL < 15 lets PUBLIC create).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO matchmaker_owner;
GRANT USAGE ON SCHEMA public TO matchmaker_worker, matchmaker_api;

-- Every table, sequence and function of the schema passes to the owner, whichever
-- migrations created them (0009 or later ones applied before this file included).
DO $$
DECLARE
    object record;
BEGIN
    FOR object IN
        SELECT c.oid::regclass AS name FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
    LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO matchmaker_owner', object.name);
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure AS name FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO matchmaker_owner', object.name);
    END LOOP;
END
$$;

-- Functions are callable only by the roles granted below (PUBLIC may execute by default).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE matchmaker_owner IN SCHEMA public
    REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- A worker rewrites the lists of the users it matched, never a whole table's.
CREATE FUNCTION mm_delete_lists(p_event_id bigint, p_owners bigint[]) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    deleted integer;
BEGIN
    DELETE FROM user_matches m WHERE m.event_id = p_event_id AND m.profile_id = ANY (p_owners);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
ALTER FUNCTION mm_delete_lists(bigint, bigint[]) OWNER TO matchmaker_owner;
REVOKE EXECUTE ON FUNCTION mm_delete_lists(bigint, bigint[]) FROM PUBLIC;

-- Narrow writes run as the owner with a search_path nobody else can write to (pg_temp
-- last, so a caller's temporary table cannot shadow a table of the function). Trigger
-- functions run as the owner too: a profile edit by the API re-queues through them without
-- the API holding any right on the queue.
DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
           AND p.proname IN ('mm_enqueue', 'mm_claim', 'mm_complete', 'mm_fail',
                             'mm_recover_leases', 'mm_prune_batches', 'mm_queue_stats',
                             'mm_redrive', 'mm_delete_lists', 'mm_handle_departure',
                             'mm_profiles_before_update', 'mm_profiles_after_update',
                             'mm_attendees_after_insert', 'mm_attendees_before_update',
                             'mm_attendees_after_update', 'mm_attendees_before_delete',
                             'mm_dismissals_after_insert', 'mm_events_after_update',
                             'mm_defer')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = public, pg_temp',
                       fn);
    END LOOP;
END
$$;

-- The worker (and, through membership, the API's synchronous matching).
GRANT SELECT ON events, profiles, attendees, dismissals TO matchmaker_worker;
GRANT SELECT, INSERT, UPDATE ON profile_vectors TO matchmaker_worker;
GRANT SELECT, INSERT ON user_matches TO matchmaker_worker;
GRANT SELECT, INSERT, UPDATE ON matchmaking_jobs TO matchmaker_worker;
GRANT SELECT, INSERT ON matchmaking_batches TO matchmaker_worker;
GRANT SELECT, INSERT, UPDATE ON icebreakers TO matchmaker_worker;
-- Queue rows change only through the mm_* functions; the one column lets a batch lock its
-- rows in the queue's lock order (SELECT ... FOR UPDATE needs an UPDATE right).
GRANT SELECT, UPDATE (updated_at) ON matchmaking_queue TO matchmaker_worker;
GRANT EXECUTE ON FUNCTION mm_event_lock_key(bigint), mm_enqueue(bigint, bigint[], smallint, text),
    mm_claim(integer, double precision, bigint), mm_complete(bigint[], uuid),
    mm_fail(bigint[], text[], uuid, integer, double precision, double precision),
    mm_recover_leases(integer), mm_prune_batches(interval, integer, integer),
    mm_queue_stats(bigint), mm_redrive(bigint, bigint[]), mm_delete_lists(bigint, bigint[])
    TO matchmaker_worker;

-- The API on top of that: the event data it owns, pausing and resuming jobs.
GRANT INSERT, UPDATE ON events, profiles, attendees TO matchmaker_api;
GRANT INSERT ON dismissals TO matchmaker_api;

-- Migration 0009 (the embeddings provider's breaker) predates the roles: its table and
-- function get their grants here when present. A migration after this one grants its own.
DO $$
BEGIN
    IF to_regclass('public.provider_breaker') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE ON provider_breaker TO matchmaker_worker;
    END IF;
    IF to_regprocedure('public.mm_defer(bigint[], text[], uuid, double precision)') IS NOT NULL
    THEN
        GRANT EXECUTE ON FUNCTION mm_defer(bigint[], text[], uuid, double precision)
            TO matchmaker_worker;
    END IF;
END
$$;
