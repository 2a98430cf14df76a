-- One lock order for queue rows: (event_id, profile_id). Concurrent API calls that
-- enqueue overlapping users (triggers, dismissals, admin rematches) and workers that
-- complete or fail their rows could otherwise lock the same rows in different orders
-- and deadlock (found by tests/reliability/test_load.py with concurrent triggers).
-- mm_claim and mm_recover_leases never wait (SKIP LOCKED); mm_fail locks in this order
-- (0006); mm_enqueue inserts in it; mm_complete locks in it first. (mm_redrive only
-- deletes dead rows, which nothing else waits for.)

-- As in 0002, with the rows inserted (and their conflicts locked) in profile order.
CREATE OR REPLACE FUNCTION mm_enqueue(p_event_id bigint, p_profile_ids bigint[],
                                      p_priority smallint, p_reason text) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    touched integer;
BEGIN
    INSERT INTO matchmaking_queue AS q (event_id, profile_id, priority, reason)
    SELECT p_event_id, pid, p_priority, p_reason
      FROM (SELECT DISTINCT unnest(p_profile_ids) AS pid) AS ids
     ORDER BY pid
    ON CONFLICT (event_id, profile_id) WHERE status IN ('pending', 'running')
    DO UPDATE SET
        -- a pending row takes the higher priority and runs now (a new change may fix
        -- what made it back off); a running row is asked to run once more when done
        priority = CASE WHEN q.status = 'pending'
                        THEN greatest(q.priority, EXCLUDED.priority) ELSE q.priority END,
        reason = CASE WHEN q.status = 'pending' AND EXCLUDED.priority > q.priority
                      THEN EXCLUDED.reason ELSE q.reason END,
        run_after = CASE WHEN q.status = 'pending'
                         THEN least(q.run_after, now()) ELSE q.run_after END,
        rerun_requested = q.rerun_requested OR q.status = 'running',
        rerun_priority = CASE WHEN q.status = 'running'
                              THEN greatest(coalesce(q.rerun_priority, 0), EXCLUDED.priority)
                              ELSE q.rerun_priority END,
        updated_at = now();
    GET DIAGNOSTICS touched = ROW_COUNT;

    -- Touch the job row only when its status must change: a worker's batch locks the
    -- job row before the queue rows it completes, so locking them in the opposite order
    -- here on every enqueue would deadlock with it.
    IF touched > 0 THEN
        UPDATE matchmaking_jobs j
           SET status = 'running', started_at = now(), finished_at = NULL, updated_at = now()
         WHERE j.event_id = p_event_id AND j.status IN ('idle', 'done');
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM matchmaking_jobs j
                                      WHERE j.event_id = p_event_id) THEN
            INSERT INTO matchmaking_jobs (event_id, status, started_at)
            VALUES (p_event_id, 'running', now())
            ON CONFLICT (event_id) DO NOTHING;
        END IF;
    END IF;
    RETURN touched;
END
$$;

-- As in 0002, with the rows locked in the queue's lock order first.
CREATE OR REPLACE FUNCTION mm_complete(p_queue_ids bigint[], p_token uuid) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    deleted integer;
    requeued integer;
BEGIN
    PERFORM 1 FROM matchmaking_queue l WHERE l.id = ANY (p_queue_ids)
      ORDER BY l.event_id, l.profile_id, l.id FOR UPDATE;

    -- Delete first: an enqueue racing with us either sees the row gone (and inserts a
    -- fresh one) or has set rerun_requested, which keeps the row for the UPDATE below.
    DELETE FROM matchmaking_queue q
     WHERE q.id = ANY (p_queue_ids) AND q.lease_token = p_token
       AND q.status = 'running' AND NOT q.rerun_requested;
    GET DIAGNOSTICS deleted = ROW_COUNT;

    UPDATE matchmaking_queue q
       -- the original request is done: the rerun runs at the priority it asked for
       SET status = 'pending', priority = coalesce(q.rerun_priority, q.priority),
           reason = 'rerun', attempts = 0, rerun_requested = false, rerun_priority = NULL,
           lease_token = NULL, lease_expires_at = NULL, run_after = now(), last_error = NULL,
           updated_at = now()
     WHERE q.id = ANY (p_queue_ids) AND q.lease_token = p_token AND q.status = 'running';
    GET DIAGNOSTICS requeued = ROW_COUNT;
    RETURN deleted + requeued;
END
$$;
