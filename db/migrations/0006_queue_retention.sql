-- Retention for the queue tables (tests/reliability/test_table_health.py). Finished queue
-- rows are deleted and matchmaking_jobs has one row per event, but two things grew with
-- the work ever done:
--
-- 1. matchmaking_batches, one row per processed batch (the figures behind throughput in
--    admin status), was never pruned.
-- 2. matchmaking_queue kept one dead row per death, not per user: a user who dies, is
--    queued again (an edit, a rematch) and dies again piled up dead rows, and admin
--    status counted them as several dead users. Now a row going dead replaces the older
--    dead row of the same (event, user); its dead letter still redrives the user
--    (mm_redrive works by event and user).
--
-- The batch log keeps every record of the last 7 days (admin status reads only the last
-- hour; a week leaves time to look into an incident) and in any case the newest 1,000
-- records, so a service idle for a week still shows its last batches. The log is thus bounded by a week
-- of batches (or 1,000 records), whatever the total work done.
--
-- mm_recover_leases, which starts every worker invocation, prunes first. One call deletes
-- at most 5,000 records, the oldest first, so a long-unpruned log is worked off over a few
-- invocations instead of holding one up; with nothing to prune a call reads 1,000 index
-- entries (the floor below) and one more.

CREATE INDEX matchmaking_batches_finished_idx ON matchmaking_batches (finished_at, id);

CREATE FUNCTION mm_prune_batches(p_keep interval DEFAULT interval '7 days',
                                 p_keep_min integer DEFAULT 1000,
                                 p_limit integer DEFAULT 5000) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    floor_at timestamptz;
    floor_id bigint;
    pruned integer;
BEGIN
    -- the p_keep_min-th newest record: only records older than it may go
    SELECT b.finished_at, b.id INTO floor_at, floor_id
      FROM matchmaking_batches b
     ORDER BY b.finished_at DESC, b.id DESC
    OFFSET greatest(p_keep_min, 1) - 1 LIMIT 1;
    IF floor_id IS NULL THEN
        RETURN 0;  -- fewer records than p_keep_min
    END IF;
    WITH old AS (
        SELECT b.id FROM matchmaking_batches b
         WHERE b.finished_at < now() - p_keep
           AND (b.finished_at, b.id) < (floor_at, floor_id)
         ORDER BY b.finished_at, b.id
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED  -- two invocations pruning at once do not wait
    )
    DELETE FROM matchmaking_batches b USING old WHERE b.id = old.id;
    GET DIAGNOSTICS pruned = ROW_COUNT;
    RETURN pruned;
END
$$;

-- As in 0002, with the pruning first and superseded dead rows removed. Expired rows
-- are taken with SKIP LOCKED: a row someone holds is being dealt with, and waiting for
-- it could deadlock with that holder (0007 explains the lock order).
CREATE OR REPLACE FUNCTION mm_recover_leases(p_max_attempts integer)
RETURNS TABLE (queue_id bigint, event_id bigint, profile_id bigint, status text,
               attempts integer, last_error text)
LANGUAGE sql
AS $$
    SELECT mm_prune_batches();

    WITH expired AS (
        SELECT e.id FROM matchmaking_queue e
         WHERE e.status = 'running' AND e.lease_expires_at < now()
           FOR UPDATE SKIP LOCKED
    ),
    recovered AS (
    UPDATE matchmaking_queue q
       SET status = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                         THEN 'dead' ELSE 'pending' END,
           dead_at = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                          THEN now() END,
           attempts = CASE WHEN q.rerun_requested THEN 0 ELSE q.attempts END,
           priority = greatest(q.priority, coalesce(q.rerun_priority, 0)),
           rerun_requested = false, rerun_priority = NULL,
           lease_token = NULL, lease_expires_at = NULL, run_after = now(),
           last_error = 'lease expired: the worker crashed or ran out of time',
           updated_at = now()
      FROM expired
     WHERE q.id = expired.id
    RETURNING q.id, q.event_id, q.profile_id, q.status, q.attempts, q.last_error
    ),
    superseded AS (
        DELETE FROM matchmaking_queue d USING recovered r
         WHERE r.status = 'dead' AND d.event_id = r.event_id AND d.profile_id = r.profile_id
           AND d.status = 'dead' AND d.id <> r.id
    )
    SELECT r.id, r.event_id, r.profile_id, r.status, r.attempts, r.last_error FROM recovered r;
$$;

-- As in 0002, with superseded dead rows removed and the rows locked in the queue's one
-- lock order first (0007).
CREATE OR REPLACE FUNCTION mm_fail(p_queue_ids bigint[], p_errors text[], p_token uuid,
                                   p_max_attempts integer, p_backoff_base_s double precision,
                                   p_backoff_max_s double precision)
RETURNS TABLE (queue_id bigint, event_id bigint, profile_id bigint, status text,
               attempts integer, last_error text)
LANGUAGE sql
AS $$
    SELECT count(*) FROM (
        SELECT 1 FROM matchmaking_queue l WHERE l.id = ANY (p_queue_ids)
         ORDER BY l.event_id, l.profile_id, l.id FOR UPDATE
    ) AS locked;

    WITH failed AS (
    UPDATE matchmaking_queue q
       -- an edit that arrived during the attempt is a new request: it gets fresh
       -- attempts instead of being buried with the dead row
       SET status = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                         THEN 'dead' ELSE 'pending' END,
           dead_at = CASE WHEN q.attempts >= p_max_attempts AND NOT q.rerun_requested
                          THEN now() END,
           attempts = CASE WHEN q.rerun_requested THEN 0 ELSE q.attempts END,
           priority = greatest(q.priority, coalesce(q.rerun_priority, 0)),
           rerun_requested = false, rerun_priority = NULL,
           run_after = now() + make_interval(secs =>
               least(p_backoff_max_s, p_backoff_base_s * 2 ^ greatest(q.attempts - 1, 0))
               * (0.5 + random() / 2)),
           lease_token = NULL, lease_expires_at = NULL,
           last_error = left(f.error, 2000), updated_at = now()
      FROM unnest(p_queue_ids, p_errors) AS f(id, error)
     WHERE q.id = f.id AND q.lease_token = p_token AND q.status = 'running'
    RETURNING q.id, q.event_id, q.profile_id, q.status, q.attempts, q.last_error
    ),
    superseded AS (
        DELETE FROM matchmaking_queue d USING failed f
         WHERE f.status = 'dead' AND d.event_id = f.event_id AND d.profile_id = f.profile_id
           AND d.status = 'dead' AND d.id <> f.id
    )
    SELECT f.id, f.event_id, f.profile_id, f.status, f.attempts, f.last_error FROM failed f;
$$;
