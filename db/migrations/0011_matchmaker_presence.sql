-- Which matchmaker runs are present: a woken run that lingers (polls for new rows after
-- the queue ran dry) holds a lease here, renewed at every poll. The API reads it after
-- the commit that queued work and sends no wake while a lease is valid: the present run
-- will claim the row (docs/architecture.md, "Waking the matchmaker", has the argument
-- why no wake is lost). A run that dies without leaving keeps its row until lease_until
-- passes; expired rows are pruned by the next run that holds a lease.
CREATE TABLE matchmaker_presence (
    run_id      uuid PRIMARY KEY,
    worker_id   text NOT NULL,
    lease_until timestamptz NOT NULL,
    since       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Hold (or renew) a run's lease for p_lease_s seconds from now, on the database's clock
-- (the one the API compares with), and drop leases that expired. Returns whether another
-- run that came before this one is present: an idle run then leaves at once (two runs
-- polling an empty queue serve no one better than one; the oldest stays).
CREATE FUNCTION mm_hold_presence(p_run_id uuid, p_worker_id text, p_lease_s double precision)
RETURNS boolean
LANGUAGE sql
SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    DELETE FROM matchmaker_presence WHERE lease_until < clock_timestamp();
    INSERT INTO matchmaker_presence (run_id, worker_id, lease_until)
    VALUES (p_run_id, left(p_worker_id, 200), clock_timestamp() + make_interval(secs => p_lease_s))
    ON CONFLICT (run_id) DO UPDATE SET lease_until = EXCLUDED.lease_until;
    SELECT EXISTS (
        SELECT 1 FROM matchmaker_presence o, matchmaker_presence me
         WHERE me.run_id = p_run_id AND o.run_id <> p_run_id
           AND o.lease_until > clock_timestamp()
           AND (o.since, o.run_id) < (me.since, me.run_id)
    );
$$;

-- A run leaves: its lease is gone once this statement commits.
CREATE FUNCTION mm_release_presence(p_run_id uuid) RETURNS void
LANGUAGE sql
SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    DELETE FROM matchmaker_presence WHERE run_id = p_run_id;
$$;

ALTER TABLE matchmaker_presence OWNER TO matchmaker_owner;
ALTER FUNCTION mm_hold_presence(uuid, text, double precision) OWNER TO matchmaker_owner;
ALTER FUNCTION mm_release_presence(uuid) OWNER TO matchmaker_owner;
REVOKE EXECUTE ON FUNCTION mm_hold_presence(uuid, text, double precision),
    mm_release_presence(uuid) FROM PUBLIC;

-- The worker writes its lease only through the two functions; the API only reads.
-- (The API is a member of matchmaker_worker for the legacy synchronous trigger, so it
-- could call them too; neither role may write the table directly.)
GRANT SELECT ON matchmaker_presence TO matchmaker_worker, matchmaker_api;
GRANT EXECUTE ON FUNCTION mm_hold_presence(uuid, text, double precision),
    mm_release_presence(uuid) TO matchmaker_worker;
